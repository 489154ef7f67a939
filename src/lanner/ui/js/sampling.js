// The Sampling panel (in the Chat tab's sidebar), read here for every request
// that generates: Chat, Compare and the Arena answer with the same settings.

const $ = (id) => document.getElementById(id);
const FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "seed"];
const LABELS = { temperature: "temperature", top_p: "top-p", top_k: "top-k", max_tokens: "max tokens", seed: "seed" };

/** The panel's values as request fields (OpenAI's names); an empty box is left
 *  out, so the server's default applies. */
export function sampling() {
  const out = {};
  for (const id of FIELDS) if ($(id).value !== "") out[id] = Number($(id).value);
  return out;
}

function summary() {
  const values = sampling();
  const parts = FIELDS.map((id) => `${LABELS[id]} ${values[id] ?? (id === "seed" ? "random" : "default")}`);
  return `Sampling (set under Chat): ${parts.join(", ")}`;
}

/** Shows each slider's value beside it, and the settings in use in each of
 *  ``notes`` (the other tabs, where the panel is out of sight). */
export function initSampling(notes) {
  for (const id of ["temperature", "top_p"]) {
    $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
  }
  const show = () => { for (const id of notes) $(id).textContent = summary(); };
  for (const id of FIELDS) $(id).addEventListener("input", show);
  show();
}
