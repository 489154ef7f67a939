// The Documents tab: upload files into a collection, one request per file,
// each with its own progress bar and its own error.

import { api, upload } from "./api.js";
import { addCollection } from "./chat.js";
import { h } from "./markdown.js";

const $ = (id) => document.getElementById(id);

export async function loadCollections() {
  const { data } = await api("/v1/lanner/collections");
  $("collections").replaceChildren(...data.map((c) =>
    h("tr", {}, h("td", {}, c.name), h("td", {}, String(c.documents)), h("td", {}, String(c.chunks)))));
  $("collection-list").replaceChildren(...data.map((c) => h("option", { value: c.name })));
  for (const c of data) addCollection(c.name);
  return data;
}

async function uploadOne(collection, file) {
  const bar = h("progress", { max: "1", value: "0", "aria-label": `${file.name} upload progress` });
  const status = h("div", { class: "status" }, "uploading…");
  const row = h("li", { "data-file": file.name }, h("span", {}, file.name), bar, status);
  $("uploads").append(row);
  const path = `/v1/lanner/collections/${encodeURIComponent(collection)}/files?filename=${encodeURIComponent(file.name)}`;
  try {
    const done = await upload(path, file, (share) => {
      bar.value = share;
      if (share >= 1) status.textContent = "reading and indexing…";
    });
    bar.value = 1;
    status.textContent = `${done.status}: ${done.chunks} passages`;
    row.classList.add("ok");
  } catch (err) {
    status.textContent = `Error: ${err.message}`;
    status.classList.add("error");
    row.classList.add("failed");
  }
}

export function initDocuments() {
  $("upload-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const collection = $("collection-name").value.trim();
    const files = [...$("files").files];
    if (!files.length) return;
    for (const file of files) await uploadOne(collection, file);
    $("files").value = "";
    await loadCollections();
  });
}
