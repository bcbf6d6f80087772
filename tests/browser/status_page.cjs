// Open meshnode's status page in headless Debian Chromium (playwright-core), wait until it
// has rendered the node's status with a live job, print what a person sees as JSON and
// save a screenshot.   node status_page.cjs URL SCREENSHOT.png
"use strict";
const { chromium } = require("playwright-core");

const [url, screenshot] = process.argv.slice(2);
const TIMEOUT_MS = 20000;

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    await page.goto(url, { timeout: TIMEOUT_MS });
    await page.waitForSelector("body[data-loaded='1']", { timeout: TIMEOUT_MS });
    await page.waitForFunction(
      () => document.querySelector("#livecount .v")?.textContent !== "0", null,
      { timeout: TIMEOUT_MS });
    const text = async (sel) => (await page.textContent(sel)).trim();
    const result = {
      title: await page.title(),
      role: await text("#role"),
      peer: await text("#peer"),
      tokps: await text("#tokps .v"),
      live: await text("#livecount .v"),
      earned: await text("#earned .v"),
      liveRows: await page.$$eval("#live tbody tr", (rows) => rows.map((r) => r.innerText)),
      meshRows: await page.$$eval("#mesh tbody tr", (rows) => rows.map((r) => r.innerText)),
      errors,
    };
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(JSON.stringify(result));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
