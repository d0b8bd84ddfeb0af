// The chat page in headless Chromium, driven by Playwright (run by crates/cli/tests/cli.rs).
//
// usage: node chat_page.mjs URL IMAGE QUESTION EXPECTED SCREENSHOT
//
// Attaches IMAGE through the file picker, sets temperature 0, asks QUESTION and waits for
// the streamed answer to equal EXPECTED; upvotes it; then Regenerate must give it again and
// Clear must empty the conversation. Saves a screenshot of the answered page. Prints `ok` last.
// playwright-core lives in target/client-node (installed by scripts/test.sh); its path
// comes in PLAYWRIGHT_CORE because ES modules resolve packages from the script's folder.
const { chromium } = await import(process.env.PLAYWRIGHT_CORE || "playwright-core");

const [url, image, question, expected, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ locale: "ko-KR" });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("model").textContent.length > 0);
  await page.setInputFiles("#file", image);
  await page.locator("#preview").waitFor({ state: "visible" });
  await page.$eval("#temperature", (el) => { el.value = "0"; el.dispatchEvent(new Event("input")); });
  await page.selectOption("#aspect", "pad");   // the demo model's own mode: the same answer
  await page.fill("#input", question);
  await page.click("#send");
  const answered = (exp) => page.waitForFunction((exp) => {
    const spans = [...document.querySelectorAll(".msg.assistant span")];
    const last = spans[spans.length - 1];
    return last && last.textContent.trim() === exp && !document.getElementById("send").disabled;
  }, exp, { timeout: 60000 });
  await answered(expected);
  if ((await page.locator(".msg.user img").count()) !== 1) throw new Error("the image is not shown in the user's message");
  await page.screenshot({ path: shot, fullPage: true });
  // Votes: enabled once there is an answer, sent once (the server logs them).
  await page.click("#upvote");
  await page.waitForFunction(() => document.getElementById("upvote").disabled && document.getElementById("flag").disabled);
  await page.click("#regenerate");
  await answered(expected);
  if ((await page.locator(".msg.assistant").count()) !== 1) throw new Error("regenerate should replace the answer");
  await page.click("#clear");
  if ((await page.locator(".msg").count()) !== 0) throw new Error("clear should empty the log");
  if (errors.length) throw new Error("page errors: " + errors.join("; "));
  console.log("ok");
} finally {
  await browser.close();
}
