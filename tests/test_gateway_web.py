"""The gateway's web page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium): enter
the API key, upload a voice, speak a sentence, submit a job and watch its progress bar rise live, download the
M4B, cancel a second job — all against a real gateway in front of a real tritonserver on the tiny model."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest

selenium = pytest.importorskip("selenium")

KEY = "web-key-0123456789abcdef"
ENV = {
    "TTS_GATEWAY_API_KEYS": KEY,
    "TTS_GATEWAY_MAX_REQUESTS_PER_MINUTE": "100000",
    "TTS_GATEWAY_JOB_PART_CHARS": "160",
    "TTS_GATEWAY_JOB_PARTS_IN_FLIGHT": "1",
    "TTS_GATEWAY_JOB_POLL_S": "0.3",
}
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--autoplay-policy=no-user-gesture-required")


def _browser_paths() -> tuple[str, str]:
    chromium = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)), None)
    driver = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and os.path.exists(p)),
                  None)
    if not chromium or not driver:
        pytest.fail("chromium / chromedriver are missing. Fix: apt-get install -y chromium chromium-driver "
                    "(.ci/run does)")
    return chromium, driver


@pytest.fixture(scope="module")
def gateway(tiny_export_dir, tmp_path_factory):
    from gateway_support import start_gateway_process, start_triton

    work = tmp_path_factory.mktemp("web")
    triton = start_triton(tiny_export_dir, work, max_sequences=8, max_text_chars=2000)
    try:
        proc = start_gateway_process(triton.grpc_url, work / "data", env=ENV)
        try:
            yield proc
        finally:
            proc.stop()
    finally:
        triton.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_paths()
    work = tmp_path_factory.mktemp("chromium")
    downloads = work / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={work / 'profile'}")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path, log_output=str(work / "driver.log")),
                              options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def _wait(predicate, timeout_s: float = 60, what: str = "the page"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#jobs tbody tr')].map(r => ({id: r.dataset.jobId, "
        "state: r.dataset.state, progress: r.querySelector('progress').value, "
        "eta: r.querySelector('.eta').textContent}))")


def test_the_page_runs_jobs_voices_and_speech(gateway, browser, voice_wav, tmp_path):
    import av
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(gateway.url + "/")
    assert driver.title == "triton-tts gateway"
    _wait(lambda: "API key" in driver.find_element(By.ID, "server-state").text, what="the 401 hint")
    driver.find_element(By.ID, "api-key").send_keys(KEY)
    driver.find_element(By.ID, "save-key").click()
    assert driver.execute_script("return localStorage.getItem('triton-tts.apiKey')") == KEY

    # a voice, uploaded through the page
    driver.find_element(By.ID, "voice-name").send_keys("narrator")
    driver.find_element(By.ID, "voice-file").send_keys(str(voice_wav))
    driver.find_element(By.ID, "voice-upload").click()
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#voices li[data-voice='narrator']"), what="the voice")
    _wait(lambda: driver.find_element(By.ID, "job-voice").get_attribute("value") == "narrator")

    # a sentence through the speech endpoint, played in an <audio> element
    driver.find_element(By.ID, "speech-go").click()
    _wait(lambda: driver.execute_script("const a = document.getElementById('speech-audio'); "
                                        "return a.src.startsWith('blob:') && a.duration > 0.2"), what="speech")

    # a job: its progress bar rises live, then the result downloads
    text = "# First\n\n" + " ".join(["The quiet river runs past the old stone mill."] * 6) + \
           "\n\n# Second\n\n" + " ".join(["A lantern burns in the harbor window."] * 6)
    driver.find_element(By.ID, "job-text").send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "#job-format option[value='m4b']").click()
    driver.find_element(By.ID, "job-title").send_keys("Web Book")
    driver.find_element(By.ID, "job-submit").click()
    row = _wait(lambda: _rows(driver), what="the job row")[0]
    job_id = row["id"]
    seen: list[float] = []
    etas: set[str] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = next(r for r in _rows(driver) if r["id"] == job_id)
        seen.append(float(now["progress"]))
        if now["state"] == "running":
            etas.add(now["eta"])
        if now["state"] == "succeeded":
            break
        assert now["state"] in ("queued", "running", "encoding"), now
        time.sleep(0.1)
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert any(0.0 < x < 1.0 for x in seen), seen  # seen part-way, not only at the start and the end
    assert any(":" in e for e in etas), etas  # an ETA like 0:07 was shown while running
    driver.save_screenshot(str(tmp_path / "page.png"))

    driver.find_element(By.CSS_SELECTOR, f"tr[data-job-id='{job_id}'] button.download").click()
    result = _wait(lambda: next(iter(driver.downloads.glob("Web Book*.m4b")), None), what="the download")
    _wait(lambda: not list(driver.downloads.glob("*.crdownload")), what="the download to finish")
    with av.open(io.BytesIO(Path(result).read_bytes())) as container:
        assert [c["metadata"]["title"] for c in container.chapters()] == ["First", "Second"]

    # a second job, cancelled from the page
    driver.find_element(By.ID, "job-text").send_keys("\n\n".join([text] * 3))
    driver.find_element(By.ID, "job-submit").click()
    second = _wait(lambda: next((r for r in _rows(driver) if r["id"] != job_id), None), what="the second job")
    _wait(lambda: next(r for r in _rows(driver) if r["id"] == second["id"])["state"] == "running",
          what="the second job to run")
    driver.find_element(By.CSS_SELECTOR, f"tr[data-job-id='{second['id']}'] button.cancel").click()
    _wait(lambda: next(r for r in _rows(driver) if r["id"] == second["id"])["state"] == "cancelled",
          what="the cancel")
    assert "error" not in (driver.find_element(By.ID, "status").get_attribute("class") or "")
