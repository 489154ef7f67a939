// The Compare tab (one prompt to 2-4 models, streamed in columns) and the
// Arena tab (two anonymous answers, a vote, the ratings table).

import { api, stream } from "./api.js";
import { h, render } from "./markdown.js";
import { sampling } from "./sampling.js";

const $ = (id) => document.getElementById(id);
let comparing = null;

function column(title) {
  const body = h("div", { class: "body" });
  const status = h("div", { class: "meta" });
  const el = h("section", { class: "column" }, h("h3", {}, title), body, status);
  return { el, body, status, text: "" };
}

async function runCompare(e) {
  e.preventDefault();
  const models = [...document.querySelectorAll("#compare-models input:checked")].map((i) => i.value);
  const prompt = $("compare-prompt").value.trim();
  if (models.length < 2 || models.length > 4) {
    $("compare-columns").replaceChildren(h("p", { class: "error", role: "alert" }, "Choose 2 to 4 models."));
    return;
  }
  const columns = models.map((m) => column(m));
  $("compare-columns").replaceChildren(...columns.map((c) => c.el));
  comparing = new AbortController();
  $("compare-send").disabled = true;
  $("compare-stop").hidden = false;
  try {
    await stream("/v1/lanner/compare", { models, prompt, stream: true, ...sampling() }, (ev) => {
      if (ev.object !== "lanner.comparison.chunk") return;
      const col = columns[ev.index];
      if (ev.delta) {
        col.text += ev.delta;
        col.body.replaceChildren(render(col.text));
      } else if (ev.finish_reason) {
        col.status.textContent = `${ev.usage.completion_tokens} tokens, ${ev.finish_reason}`;
      }
    }, comparing.signal);
  } catch (err) {
    if (err.name !== "AbortError") {
      $("compare-columns").prepend(h("p", { class: "error", role: "alert" }, `Error: ${err.message}`));
    }
  } finally {
    $("compare-send").disabled = false;
    $("compare-stop").hidden = true;
  }
}

let battle = null;

async function runBattle(e) {
  e.preventDefault();
  const prompt = $("arena-prompt").value.trim();
  $("arena-send").disabled = true;
  $("arena-vote").hidden = true;
  $("arena-answers").replaceChildren();
  $("arena-status").textContent = "Two models are answering…";
  try {
    // One set of settings for both sides (a seed too), so only the model differs.
    battle = await api("/v1/lanner/arena/battles", { prompt, ...sampling() });
    const a = column("Answer A");
    const b = column("Answer B");
    a.body.append(render(battle.answers.a));
    b.body.append(render(battle.answers.b));
    $("arena-answers").replaceChildren(a.el, b.el);
    $("arena-status").textContent = "Which answer is better?";
    $("arena-vote").hidden = false;
    $("arena-vote").querySelector("button").focus();
  } catch (err) {
    $("arena-status").textContent = `Error: ${err.message}`;
  } finally {
    $("arena-send").disabled = false;
  }
}

async function vote(winner) {
  if (!battle) return;
  const id = battle.id;
  battle = null;
  $("arena-vote").hidden = true;
  try {
    const result = await api(`/v1/lanner/arena/battles/${encodeURIComponent(id)}/vote`, { winner });
    const [a, b] = $("arena-answers").querySelectorAll("h3");
    a.textContent = `A: ${result.model_a}`;
    b.textContent = `B: ${result.model_b}`;
    $("arena-status").textContent = "Vote recorded; the names are revealed.";
    await loadRatings();
  } catch (err) {
    $("arena-status").textContent = `Error: ${err.message}`;
  }
}

export async function loadRatings() {
  const { votes, data } = await api("/v1/lanner/arena/ratings");
  $("ratings-caption").textContent = votes ? `${votes} vote${votes === 1 ? "" : "s"}` : "No votes yet.";
  const round = (x) => Math.round(x).toString();
  $("ratings").replaceChildren(...data.map((r) => h("tr", {},
    h("td", {}, r.model), h("td", {}, round(r.rating)), h("td", {}, `${round(r.low)} to ${round(r.high)}`),
    h("td", {}, String(r.wins)), h("td", {}, String(r.losses)), h("td", {}, String(r.ties)))));
}

export function initCompare(models) {
  $("compare-models").replaceChildren(...models.map((m, i) => h("label", {},
    h("input", { type: "checkbox", value: m.id, checked: i < 2 }), m.id)));
  $("compare-form").addEventListener("submit", runCompare);
  $("compare-stop").addEventListener("click", () => comparing?.abort());
  $("arena-form").addEventListener("submit", runBattle);
  for (const b of $("arena-vote").querySelectorAll("button")) {
    b.addEventListener("click", () => vote(b.dataset.winner));
  }
}
