// Numbered citations in a documents answer: each [n] becomes a button that
// opens the cited passage (file, page, characters, the span highlighted);
// a citation the server could not verify ([n?]) is marked as such.

import { h } from "./markdown.js";

const GROUP = /\[(\s*\d+\??(?:\s*(?:,|;|and)\s*\d+\??)*\s*)\]/g;

function openPassage(source, checks) {
  const name = source.path.split(/[\\/]/).pop();
  document.getElementById("passage-title").textContent = `[${source.number}] ${name}`;
  const page = source.page ? `page ${source.page}, ` : "";
  const heading = source.heading ? ` (${source.heading})` : "";
  document.getElementById("passage-where").textContent =
    `${source.path}, ${page}characters ${source.start}-${source.end}${heading}`;
  const check = document.getElementById("passage-check");
  check.replaceChildren(...checks.map((c) => h("span", { class: c.verified ? "" : "error" },
    `${c.verified ? "Verified" : "Not verified"}: "${c.claim}" (${c.reason}). `)));
  document.getElementById("passage-text").replaceChildren(h("mark", {}, source.text));
  document.getElementById("passage-dialog").showModal();
}

/** A markdown hook turning citation markers into buttons, for ``citations``
 *  (the ``citations`` object of a chat completion with a collection). */
export function citationHook(citations) {
  const sources = new Map(citations.sources.map((s) => [s.number, s]));
  return (text) => {
    const out = [];
    let last = 0;
    for (const m of text.matchAll(GROUP)) {
      out.push(text.slice(last, m.index));
      for (const part of m[1].match(/\d+\??/g)) {
        const number = parseInt(part, 10);
        const source = sources.get(number);
        const unverified = part.endsWith("?") || !source;
        const checks = citations.citations.filter((c) => c.number === number);
        out.push(h("button", {
          type: "button", class: `cite${unverified ? " unverified" : ""}`,
          title: unverified ? "citation not verified against the passage" : "open the cited passage",
          "aria-label": `source ${number}${unverified ? ", not verified" : ""}`,
          onclick: () => source && openPassage(source, checks),
        }, unverified ? `${number}?` : String(number)));
      }
      last = m.index + m[0].length;
    }
    out.push(text.slice(last));
    return out;
  };
}

/** For an answer that cites nothing: the best-matching sentence of each top
 *  passage, copied from the documents (``citations.extracted``), or null. */
export function extractedNote(citations) {
  if (!citations?.extracted?.length) return null;
  const hook = citationHook(citations);
  return h("div", { class: "extracted" },
    h("p", {}, "The answer cites no passage. What the top passages say "
      + "(extracted from the documents, not written by the model):"),
    h("ul", {}, citations.extracted.map((e) => h("li", {}, hook(`[${e.number}]`), " ", h("q", {}, e.text)))));
}
