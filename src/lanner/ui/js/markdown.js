// Safe Markdown: text becomes DOM nodes through textContent and createElement
// only. No string from a user or a model is ever parsed as HTML, so a reply
// containing <script> or <img onerror=...> shows as those characters.

/** An element with attributes and children (strings become text nodes). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// Inline: `code`, **bold**, *italic* / _italic_, and hooks (citations) on text.
const INLINE = /(`+)([^`]+?)\1|\*\*(.+?)\*\*|(?<![\w*])\*(?!\s)(.+?)\*(?!\w)|(?<!\w)_(?!\s)(.+?)_(?!\w)/gs;

function inline(text, hook) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(...plain(text.slice(last, m.index), hook));
    if (m[2] !== undefined) out.push(h("code", {}, m[2]));
    else if (m[3] !== undefined) out.push(h("strong", {}, inline(m[3], hook)));
    else out.push(h("em", {}, inline(m[4] ?? m[5], hook)));
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(...plain(text.slice(last), hook));
  return out;
}

function plain(text, hook) {
  return hook ? hook(text) : [text];
}

/** Markdown ``text`` as a DocumentFragment: fenced code, headings, lists,
 *  block quotes, paragraphs; ``hook(text) -> nodes`` may replace plain text
 *  (the citation buttons use it). */
export function render(text, hook = null) {
  const frag = document.createDocumentFragment();
  const lines = text.replace(/\r\n/g, "\n").split("\n");
  let para = [];
  let list = null;
  const flushPara = () => {
    if (para.length) frag.append(h("p", {}, inline(para.join("\n"), hook)));
    para = [];
  };
  const flushList = () => { if (list) frag.append(list); list = null; };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)/);
    if (fence) {
      flushPara(); flushList();
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      const code = h("code", fence[2] ? { class: `language-${fence[2]}` } : {}, body.join("\n"));
      frag.append(h("pre", {}, code));
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/);
    if (!line.trim()) { flushPara(); flushList(); }
    else if (heading) {
      flushPara(); flushList();
      frag.append(h(`h${Math.min(heading[1].length + 2, 6)}`, {}, inline(heading[2], hook)));
    } else if (item) {
      flushPara();
      const tag = item[1] ? "ol" : "ul";
      if (!list || list.tagName.toLowerCase() !== tag) { flushList(); list = h(tag); }
      list.append(h("li", {}, inline(item[2], hook)));
    } else if (line.startsWith(">")) {
      flushPara(); flushList();
      frag.append(h("blockquote", {}, inline(line.replace(/^>\s?/, ""), hook)));
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara(); flushList();
  return frag;
}
