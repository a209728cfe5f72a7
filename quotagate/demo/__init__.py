"""The demo: an application of the gateway — an upstream that answers like the platform's
services (``upstream``), a walkthrough of every rule against it (``walkthrough``), and what the
demo, the load tests and the test suite share to stage a gateway (``staging``)."""
