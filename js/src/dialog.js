// The Clone-Modify dialog: a form pre-filled with the run's varying hyper-parameters (as JSON), a "+ field" for
// any other one, and Warm start. Submit sends only the fields that changed; a refusal shows in the dialog.

import { h } from "./dom.js";
import { shortName } from "./format.js";

let dialogCount = 0; // ids of dialog titles, unique in the page

/**
 * Open the dialog for `run` in `overlay`; `params` are the varying parameter paths, `request(message, onReply)`
 * sends to the kernel.
 */
export function openCloneDialog(overlay, run, params, request) {
  const fields = [];
  const list = h("div", { class: "rfnb-fields" });
  // Every value input is labelled with its field's name ("learning_rate"), a new pair's as soon as it is typed.
  const addField = (name = "", value = "", fixedName = false) => {
    const n = fields.length + 1;
    const nameInput = h("input", {
      class: "rfnb-field-name",
      value: name,
      readonly: fixedName,
      placeholder: "field",
      "aria-label": fixedName ? `field ${n} name` : `new field ${n} name`,
    });
    const valueInput = h("input", { class: "rfnb-field-value", value, placeholder: "value (JSON)" });
    const labelValue = () => valueInput.setAttribute("aria-label", nameInput.value.trim() || `new field ${n} value`);
    labelValue();
    nameInput.addEventListener("input", labelValue);
    fields.push({ nameInput, valueInput, initial: value });
    list.append(h("div", { class: "rfnb-field" }, nameInput, valueInput));
    return nameInput;
  };
  for (const path of params) {
    if (path in (run.params ?? {})) addField(shortName(path), JSON.stringify(run.params[path]), true);
  }
  const warm = h("input", { type: "checkbox", class: "rfnb-warm" });
  const titleId = `rfnb-dialog-title-${++dialogCount}`;
  const error = h("div", { class: "rfnb-dialog-error", role: "alert" });
  const submit = h("button", { class: "rfnb-submit" }, "Submit");
  const close = () => {
    overlay.hidden = true;
    overlay.replaceChildren();
  };
  submit.addEventListener("click", () => {
    const overrides = {};
    for (const f of fields) {
      const name = f.nameInput.value.trim();
      const text = f.valueInput.value.trim();
      if (!name || text === f.initial) continue;
      overrides[name] = parseValue(text);
    }
    error.textContent = "";
    submit.disabled = true;
    request({ type: "op", op: "clone_modify", run_id: run.id, overrides, warm_start: warm.checked }, (reply) => {
      submit.disabled = false;
      if (reply.ok) close();
      else error.textContent = reply.message;
    });
  });
  const dialog = h(
    "div",
    { class: "rfnb-dialog", role: "dialog", "aria-modal": "true", "aria-labelledby": titleId },
    h("div", { class: "rfnb-dialog-title", id: titleId }, `Clone-Modify: ${run.name}`),
    list,
    h("button", { class: "rfnb-add-field", "aria-label": "add a field", onclick: () => addField().focus() }, "+ field"),
    h("label", { class: "rfnb-warm-label" }, warm, " Warm start (continue from this run's weights, optimizer and step)"),
    error,
    h("div", { class: "rfnb-dialog-buttons" }, submit, h("button", { class: "rfnb-dialog-cancel", onclick: close }, "Cancel")),
  );
  overlay.replaceChildren(dialog);
  overlay.hidden = false;
  return dialog;
}

/** A typed value from a form field: JSON when it parses (3e-4, 16, true, "x", [..]), the text otherwise. */
export function parseValue(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}
