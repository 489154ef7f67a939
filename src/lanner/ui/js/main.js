// Start-up: tabs (arrow keys move between them, as ARIA's tab pattern asks),
// then each tab's data from the server.

import { api } from "./api.js";
import { initChat } from "./chat.js";
import { initCompare, loadRatings } from "./compare.js";
import { initDocuments, loadCollections } from "./documents.js";
import { initSampling } from "./sampling.js";
import { installTips } from "./tokens.js";

const tabs = [...document.querySelectorAll("[role=tab]")];

function select(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
}

tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => select(tab));
  tab.addEventListener("keydown", (e) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (step) select(tabs[(i + step + tabs.length) % tabs.length]);
  });
});

installTips();
initSampling(["compare-sampling", "arena-sampling"]);
document.getElementById("prompt").focus();
const { data: models } = await api("/v1/lanner/models");
initDocuments();
await loadCollections().catch(() => []);
initCompare(models);
await initChat(models);
await loadRatings();
document.body.dataset.ready = "true";
