"""The pieces of ``loadtests/bench.py`` (see loadtests/README.md, "Adding an arm").

- ``common``: paths, the benchmark's environments and routes, the gateway configs;
- ``procs``: the child processes, readiness, CPU accounting from /proc;
- ``store_stats``: the store's ``INFO commandstats``;
- ``wrk``: the wrk command, its runs and the parsing of its output;
- ``arm``: what an arm is (``ArmDef``, defined once per file of ``arms/``) and what it is
  once started (``Arm``);
- ``arms``: one module per arm, registered in ``arms/__init__.py``;
- ``measure``: one measured slice of an arm (``Sample``);
- ``report``: the table, the ratios and the commands;
- ``cli``: the options and the run (start every arm, warm up, interleaved passes).
"""
