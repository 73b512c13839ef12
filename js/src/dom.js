// DOM helpers. Every piece of text goes into the DOM as text (never as HTML), so run names cannot inject markup.

/** Create an element: `h("td", {class: "x", onclick}, "text", child)`; strings become text nodes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "style") el.style.cssText = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Set an element's text only when it changed (no needless DOM writes on every update). */
export function setText(el, value) {
  if (el.textContent !== value) el.textContent = value;
}

/** Only `#rgb` / `#rrggbb` colours reach a style attribute. */
export function safeColor(color) {
  return /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.test(String(color)) ? color : "#888888";
}
