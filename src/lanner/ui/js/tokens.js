// The token-probability view: each generated token tinted by its probability;
// hovering, focusing or tapping one shows its probability and the top
// alternatives the model weighed (the API's logprobs / top_logprobs).

import { h } from "./markdown.js";

const pct = (logprob) => `${(Math.exp(logprob) * 100).toFixed(1)}%`;
const shown = (text) => JSON.stringify(text).slice(1, -1);  // newlines and spaces visible

function band(logprob) {
  const p = Math.exp(logprob);
  return p >= 0.7 ? "p-high" : p >= 0.3 ? "p-mid" : "p-low";
}

/** Spans for ``tokens`` (logprobs.content entries). */
export function tokenView(tokens) {
  const box = h("div", { class: "tokens" });
  tokens.forEach((t, i) => {
    const known = typeof t.logprob === "number";
    box.append(h("span", {
      class: `tok ${known ? band(t.logprob) : ""}`, tabindex: "0", "data-index": String(i),
      "aria-label": known ? `${shown(t.token)}: ${pct(t.logprob)}` : shown(t.token),
    }, t.token));
  });
  box.tokens = tokens;
  return box;
}

function tipContent(t) {
  const rows = (t.top_logprobs || []).map((alt) => h("tr", { class: alt.token === t.token ? "chosen" : "" },
    h("td", {}, shown(alt.token)), h("td", {}, pct(alt.logprob))));
  return [
    h("div", { class: "chosen" }, `${shown(t.token)}  ${typeof t.logprob === "number" ? pct(t.logprob) : ""}`),
    rows.length ? h("table", { "aria-label": "top alternatives" }, rows) : h("div", {}, "no alternatives recorded"),
  ];
}

/** One tooltip for the whole page, following hover, keyboard focus and taps. */
export function installTips() {
  const tip = document.getElementById("tip");
  const show = (el) => {
    const box = el.closest(".tokens");
    const t = box?.tokens?.[Number(el.dataset.index)];
    if (!t) return;
    tip.replaceChildren(...tipContent(t));
    tip.hidden = false;
    const r = el.getBoundingClientRect();
    const left = Math.min(r.left, window.innerWidth - tip.offsetWidth - 8);
    const below = r.bottom + 6 + tip.offsetHeight < window.innerHeight;
    tip.style.left = `${Math.max(4, left)}px`;
    tip.style.top = `${below ? r.bottom + 6 : r.top - tip.offsetHeight - 6}px`;
  };
  const hide = () => { tip.hidden = true; };
  for (const type of ["mouseover", "focusin", "click"]) {
    document.addEventListener(type, (e) => {
      const el = e.target.closest?.(".tok");
      if (el) show(el); else if (type !== "mouseover") hide();
    });
  }
  document.addEventListener("mouseout", (e) => { if (e.target.closest?.(".tok")) hide(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hide(); });
}
