"""The console (/console on the admin listener) in a real browser: Debian's Chromium driven by
Selenium against `quotagate serve` as shipped, on the real clock. Each role signs in (admin,
billing, support, viewer, an environment's own); a
billing token buys a pack and sees usage move to it once the plan's quota is used, sees a
refund refused for a pack used meanwhile, changes a plan after reading its quote (the
figures the API gives, to the fen); a viewer sees no purchase; a tenant's token cannot see
another environment; the audit trail shows each action; the list's next page holds the rest;
text meets WCAG AA contrast and every field has a label; an admin sets the environment's
enforcement mode. Screenshots of the main pages are
taken (into docs/img with QUOTAGATE_SCREENSHOTS=1)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.deployed import ZONE, hold_the_day
from tests.helpers import QUOTAGATE, ROOT, statuses, wait_ready
from tests.test_cli_admin import TOKEN, cli, make_token, stage_gateway

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
SHOTS = ROOT / "docs" / "img"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    assert shutil.which(CHROMIUM) and shutil.which(DRIVER), \
        "Chromium and its driver are installed by scripts/chromium (scripts/test runs it)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1600", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER),
                              options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Console:
    def __init__(self, driver: webdriver.Chrome, admin: int, shots: Path):
        self.d, self.url, self.shots = driver, f"http://127.0.0.1:{admin}/console", shots
        self.wait = WebDriverWait(driver, 20)

    def sign_in(self, token: str) -> None:
        self.d.get(self.url + "#/login")
        self.d.execute_script("sessionStorage.clear()")
        self.d.refresh()  # (signed out: the page drawn afresh asks for a token)
        field = self.wait.until(ec.element_to_be_clickable((By.ID, "token")))
        field.send_keys(token, Keys.ENTER)  # the keyboard alone signs in
        try:
            self.wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#who button")))
        except TimeoutException:
            raise AssertionError("not signed in: " + self.d.find_element(
                By.TAG_NAME, "body").text[:500] + f"\nURL {self.d.current_url}\nconsole: "
                + str(self.d.get_log("browser"))[:2000]) from None

    def open(self, fragment: str, heading: str | None) -> None:
        self.d.get(f"{self.url}#{fragment}")
        self.d.refresh()  # (a new hash on the same page: draw it afresh)
        if heading is not None:
            self.heading(heading)

    def heading(self, text: str) -> None:
        self.wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "main h1"), text))

    def alert(self, text: str) -> str:
        try:
            self.wait.until(ec.text_to_be_present_in_element((By.ID, "alert"), text))
        except TimeoutException:
            raise AssertionError(f"no {text!r} in the alert: "
                                 f"{self.d.find_element(By.ID, 'alert').text!r}") from None
        return self.d.find_element(By.ID, "alert").text

    def table_after(self, title: str) -> list[dict[str, str]]:
        """The rows of the first table after the h2 ``title``, as column -> text."""
        rows = self.d.execute_script("""
            const h = [...document.querySelectorAll('main h2')].find(
                x => x.textContent === arguments[0]);
            let t = h; while (t && t.tagName !== 'TABLE') t = t.nextElementSibling;
            const cols = [...t.querySelectorAll('thead th')].map(x => x.textContent);
            return [...t.querySelectorAll('tbody tr')].map(r =>
                Object.fromEntries([...r.children].map((c, i) => [cols[i], c.textContent])));
        """, title)
        return [r for r in rows if len(r) > 1]

    def button(self, text: str):
        return self.wait.until(ec.element_to_be_clickable(
            (By.XPATH, f"//main//button[normalize-space()={json.dumps(text)}]")))

    def buttons(self, text: str) -> int:
        return len(self.d.find_elements(
            By.XPATH, f"//main//button[normalize-space()={json.dumps(text)}]"))

    def shot(self, name: str) -> None:
        self.d.save_screenshot(str(self.shots / f"console-{name}.png"))

    def low_contrast(self) -> list[str]:
        """Visible text whose contrast with the background it is drawn on is below WCAG AA
        (4.5:1; 3:1 for large text): none. The background is the nearest opaque one of the
        element and its ancestors."""
        return self.d.execute_script("""
            const rgba = s => { const m = s.match(/[\\d.]+/g).map(Number);
                                return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; };
            const lum = c => { const [r, g, b] = c.slice(0, 3).map(v => { v /= 255;
                return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
                return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
            const under = e => { for (; e; e = e.parentElement) {
                const c = rgba(getComputedStyle(e).backgroundColor);
                if (c[3] > 0) return c; } return [255, 255, 255, 1]; };
            const bad = [];
            for (const e of document.querySelectorAll('body *')) {
              if (![...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))
                continue;
              const st = getComputedStyle(e), box = e.getBoundingClientRect();
              if (st.visibility === 'hidden' || box.width === 0 || box.right < 0) continue;
              const a = lum(rgba(st.color)), b = lum(under(e));
              const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
              const size = parseFloat(st.fontSize), bold = parseInt(st.fontWeight) >= 700;
              const need = size >= 24 || (size >= 18.66 && bold) ? 3 : 4.5;
              if (ratio < need) bad.push(`${e.tagName} "${e.textContent.trim().slice(0, 40)}"`
                                        + ` ${st.color} on ${getComputedStyle(e).backgroundColor}`
                                        + ` ${ratio.toFixed(2)}`);
            }
            return bad;""")

    def unlabelled(self) -> list[str]:
        """Form fields without a label (accessibility): none."""
        return self.d.execute_script("""
            return [...document.querySelectorAll('input, select')].filter(
                i => !i.closest('label') && !i.getAttribute('aria-label')).map(i => i.name);""")


@pytest.mark.deployed
async def test_the_console_in_a_browser(tmp_path: Path, valkey_url: str, upstream,
                                        browser) -> None:
    shots = SHOTS if os.environ.get("QUOTAGATE_SCREENSHOTS") else tmp_path
    port, admin = stage_gateway(tmp_path, valkey_url, upstream.port)
    hold_the_day()
    today = dt.datetime.now(ZONE).date()
    anchor = today.replace(day=1)
    # More environments than a page of the list (50): "zz-00".."zz-59" sort after the others.
    declared = {"mall": {"plan": "standard", "anchor": anchor.isoformat(),
                         "expires": (anchor + dt.timedelta(days=400)).isoformat()}}
    declared.update({f"zz-{i:02d}": declared["mall"] for i in range(60)})
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": declared}))
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QUOTAGATE_ADMIN_TOKEN": TOKEN})
    try:
        await wait_ready(admin, proc)
        shop = tmp_path / "shop.yaml"
        shop.write_text(yaml.safe_dump({
            "plan": "personal", "anchor": anchor.isoformat(),
            "expires": (anchor + dt.timedelta(days=400)).isoformat(),
            "limits": {"calls": 3}}))
        assert cli(admin, "env", "put", "shop", str(shop)).returncode == 0

        billing = make_token(admin, "billing desk", "billing")
        viewer = make_token(admin, "auditor", "viewer")
        support = make_token(admin, "support desk", "support")
        tenant = make_token(admin, "shop's owner", "env", "--env", "shop")
        page = Console(browser, admin, shots)

        # Billing: the list, then shop's page.
        page.sign_in(billing["token"])
        page.heading("Environments")
        listed = browser.execute_script(
            "return [...document.querySelectorAll('main tbody a')].map(a => a.textContent)")
        assert {"mall", "shop"} <= set(listed)
        assert page.unlabelled() == [] and page.low_contrast() == []
        page.shot("environments")
        # The next page (the API's cursor) holds the rest, none twice; the last has no link.
        browser.find_element(By.LINK_TEXT, "Next page →").click()
        page.wait.until(lambda d: "cursor=" in d.current_url and d.execute_script(
            "return document.querySelectorAll('main tbody a').length") == 62 - len(listed))
        rest = browser.execute_script(
            "return [...document.querySelectorAll('main tbody a')].map(a => a.textContent)")
        assert len(listed) == 50 and sorted(listed + rest) == sorted(
            ["mall", "shop", *(f"zz-{i:02d}" for i in range(60))])
        assert not browser.find_elements(By.LINK_TEXT, "Next page →")
        page.open("/envs", "Environments")
        browser.find_element(By.NAME, "prefix").send_keys("sh", Keys.ENTER)  # a search
        try:
            page.wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('main tbody a')].map(a => a.textContent)"
            ) == ["shop"])
        except TimeoutException:
            raise AssertionError(f"{browser.current_url}: {browser.get_log('browser')}"
                                 ) from None
        browser.find_element(By.LINK_TEXT, "shop").click()
        page.heading("Environment shop")
        assert page.unlabelled() == []

        # Buy a pack; the plan's 3 calls used, the next are drawn from it.
        Select(browser.find_element(By.NAME, "pack")).select_by_value("calls-10m")
        page.button("Buy pack").click()
        page.alert("Pack calls-10m bought: done.")
        packs = page.table_after("Resource packs")
        assert [(p["Type"], p["Status"], p["Size"], p["Used"], p["Start"]) for p in packs] == [
            ("calls", "active", "10000000", "0", today.isoformat())]
        assert page.buttons("Refund") == 1  # unused, bought today: refundable
        url = f"http://127.0.0.1:{port}/functions/f"
        assert await statuses(url, "shop", 5) == [200] * 5  # 3 from the plan, 2 from the pack
        page.button("Refund").click()  # on the page drawn before: the pack is used now
        refused = page.alert("Refused (409)")
        assert "used" in refused
        assert page.low_contrast() == []  # the refusal's alert too
        page.open("/env/shop", "Environment shop")
        assert page.low_contrast() == []
        calls = next(r for r in page.table_after("Usage this cycle") if r["Meter"] == "calls")
        assert (calls["Used"], calls["Packs left"], calls["Drawing from"]) == (
            "3", "9999998", "packs")
        # The per-day chart: each day of the cycle so far, today's 5 calls the tallest bar.
        chart = browser.execute_script("""
            const c = document.getElementById('days-calls');
            const rows = [...c.parentElement.querySelectorAll('details tbody tr')];
            return {label: c.getAttribute('aria-label'),
                    heights: [...c.children].map(b => b.style.height),
                    rows: rows.map(r => [...r.children].map(x => x.textContent))};""")
        assert chart["rows"] == [[(anchor + dt.timedelta(days=n)).isoformat(),
                                  "5" if n == today.day - 1 else "0"]
                                 for n in range(today.day)], chart
        assert chart["heights"] == ["0%"] * (today.day - 1) + ["100%"], chart
        assert chart["label"].startswith(f"calls per day this cycle: 5 calls in {today.day} days")
        packs = page.table_after("Resource packs")
        assert (packs[0]["Used"], packs[0]["Refund"]) == ("2", "not refundable: used")
        assert page.buttons("Refund") == 0
        page.shot("environment")

        # Alerts: the plan's 3 calls used (80, 90, 100 %), once each.
        alerts = [r["Details"] for r in page.table_after("Events and alerts")
                  if r["Event"] == "quota-alert"]
        assert sorted(a.split("level ")[1].split(",")[0] for a in alerts) == ["100", "80", "90"]

        # A gateway version bought, then changed after reading the price of the change.
        Select(browser.find_element(By.NAME, "version")).select_by_value("test")
        Select(browser.find_element(By.NAME, "months")).select_by_value("1")
        page.button("Buy version").click()
        page.alert("Gateway test bought: done.")
        change = json.loads(cli(admin, "gateway", "change", "shop", "starter", "--quote",
                                "--json").stdout)
        Select(browser.find_element(By.NAME, "change-version")).select_by_value("starter")
        page.button("Quote change").click()
        page.button(f"Confirm: change to starter for {change['amount']} CNY").click()
        page.alert("Gateway changed to starter: done.")
        page.wait.until(ec.text_to_be_present_in_element(
            (By.XPATH, "//h2[.='Gateway version']/following-sibling::p[1]"), "starter (active)"))

        # A plan change: the quote first (the API's own figures), then the change.
        quote = json.loads(cli(admin, "plan", "quote", "shop", "standard", "--json").stdout)
        Select(browser.find_element(By.NAME, "plan")).select_by_value("standard")
        page.button("Get quote").click()
        shown = page.wait.until(ec.presence_of_element_located((By.ID, "quote-text"))).text
        assert f"{quote['amount']} CNY" in shown and quote["change"] in shown
        page.shot("plan-quote")
        page.button(f"Confirm: change to standard for {quote['amount']} CNY").click()
        page.alert("Plan changed to standard: done.")
        page.wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "main p"),
                                                         "Plan standard"))

        # The audit trail of shop: each action, by whom, with its result.
        page.open("/audit?env=shop", "Audit trail")
        rows = browser.execute_script("""
            return [...document.querySelectorAll('main tbody tr')].map(r =>
                [...r.children].map(c => c.textContent));""")
        actions = [(r[3], r[5]) for r in rows]
        assert actions[:7] == [("change_plan", "200"), ("change_gateway", "200"),
                               ("buy_gateway", "201"), ("refund_pack", "409"),
                               ("buy_pack", "201"),
                               ("create_token", "201"),  # the tenant's, for shop
                               ("put_env", "200")]
        assert all(r[1] == f"billing desk ({billing['id']})" for r in rows[:5])
        assert page.low_contrast() == []
        assert all(r[0].startswith(dt.datetime.now(dt.UTC).date().isoformat()[:7])
                   for r in rows[:5])  # the store's clock: this month, UTC
        page.shot("audit")
        # The time range: from tomorrow (UTC) nothing yet; until tomorrow, the same rows.
        tomorrow = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)).isoformat()
        count = "return document.querySelectorAll('main tbody tr').length"
        page.open(f"/audit?env=shop&since={tomorrow}", "Audit trail")
        page.wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "main table")))
        assert browser.find_element(By.CSS_SELECTOR, "main tbody").text == "(none)"
        assert browser.find_element(By.NAME, "since").get_attribute("value") == tomorrow
        page.open(f"/audit?env=shop&until={tomorrow}", "Audit trail")
        page.wait.until(lambda d: d.execute_script(count) == len(rows))

        # A viewer reads, and is offered no purchase.
        page.sign_in(viewer["token"])
        page.open("/env/shop", "Environment shop")
        assert page.buttons("Buy pack") == 0 and page.buttons("Get quote") == 0

        # Support switches overage (no money moves), and is offered no purchase.
        page.sign_in(support["token"])
        page.open("/env/shop", "Environment shop")
        assert page.buttons("Buy pack") == 0 and page.buttons("Set mode") == 0
        page.button("Turn overage on").click()
        page.alert("Overage on: done.")
        assert page.buttons("Turn overage off") == 1

        # The operator's token (admin) may do everything: purchases offered too.
        page.sign_in(TOKEN)
        page.open("/env/shop", "Environment shop")
        assert page.buttons("Buy pack") == 1 and page.buttons("Turn overage off") == 1
        assert "QUOTAGATE_ADMIN_TOKEN (admin)" in browser.find_element(By.ID, "who").text
        # The admin sets the environment's enforcement to shadow in the console, then back to
        # the gateway's default with the CLI (what each mode does: test_admin_api.py).
        assert "the gateway's default" in browser.find_element(By.ID, "mode-text").text
        Select(browser.find_element(By.NAME, "mode")).select_by_value("shadow")
        page.button("Set mode").click()
        page.alert("Mode shadow: done.")
        page.wait.until(ec.text_to_be_present_in_element(
            (By.ID, "mode-text"), "shadow: decided and counted, never refused (this "
                                  "environment's own)"))
        assert cli(admin, "env", "mode", "shop", "default").returncode == 0
        page.open("/env/shop", "Environment shop")
        assert "enforce: refused past its limits (the gateway's default)" in \
            browser.find_element(By.ID, "mode-text").text
        assert page.unlabelled() == [] and page.low_contrast() == []

        # A tenant sees its own environment, and no other.
        page.sign_in(tenant["token"])
        page.heading("Environment shop")
        nav = browser.find_element(By.ID, "nav").text
        assert "Environment shop" in nav and "Audit" not in nav
        page.open("/env/mall", None)
        assert "Refused (403)" in page.alert("Refused (403)")
        assert "mall" not in browser.find_element(By.TAG_NAME, "main").text
        errors = [e for e in browser.get_log("browser") if e["source"] == "javascript"]
        assert errors == []  # no script error on any page, in any role
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
