// The panel's view: header, curves, run table, Clone-Modify dialog and IC-op log, wired to the kernel.
// Every piece of text goes into the DOM as text (never as HTML), so run names cannot inject markup.
// The plot is created by `plotFactory` (Bokeh in the bundle, a fake in the tests); messages that arrive before
// it is ready only update the state, which is drawn once the plot exists.

import {
  applyDelta,
  curveFor,
  emptyState,
  formatDuration,
  formatValue,
  fromSnapshot,
  metricNames,
  shortName,
} from "./state.js";

const PULL_INTERVAL_MS = 700;
let dialogCount = 0; // ids of dialog titles, unique in the page
const LIVE = new Set(["queued", "training"]);

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

export class Panel {
  constructor(model, el, { plotFactory, setTimeout: later = (fn, ms) => globalThis.setTimeout(fn, ms) } = {}) {
    this.model = model;
    this.el = el;
    this.later = later;
    this.viewId = Math.random().toString(36).slice(2, 10);
    this.requests = 0;
    this.pending = new Map(); // request id -> callback(reply)
    this.state = fromSnapshot(model.get("snapshot"));
    this.view = { metric: "loss", xAxis: "step", logY: false, smoothing: 0, highlight: null };
    this.confirmDelete = null; // run id whose Delete waits for confirmation
    this.dialog = null;
    this.plot = null;
    this.syncing = false;
    this.disposed = false;
    this.updates = 0; // messages with new state received

    this.onMessage = (msg) => this.receive(msg);
    model.on("msg:custom", this.onMessage); // subscribe before anything async: nothing is missed
    this.onSnapshot = () => {
      const snap = model.get("snapshot");
      if (snap && Number(snap.cursor) >= this.state.cursor) this.replace(fromSnapshot(snap));
    };
    model.on("change:snapshot", this.onSnapshot);

    el.classList.add("rfnb");
    this.dom = this.skeleton();
    el.replaceChildren(this.dom.root);
    this.render();
    this.request({ type: "sync" });
    if (model.get("mode") === "pull") this.poll();

    this.plotReady = Promise.resolve(plotFactory ? plotFactory(this.dom.plot) : null).then((plot) => {
      if (this.disposed) return;
      this.plot = plot;
      this.draw();
    });
  }

  dispose() {
    this.disposed = true;
    this.model.off("msg:custom", this.onMessage);
    this.model.off("change:snapshot", this.onSnapshot);
    this.plot?.dispose?.();
  }

  // -- talking to the kernel ---------------------------------------------------------------------------------

  request(message, onReply) {
    const id = `${this.viewId}:${++this.requests}`;
    if (onReply) this.pending.set(id, onReply);
    this.model.send({ ...message, id });
    return id;
  }

  poll() {
    if (this.disposed) return;
    this.request({ type: "pull", since: this.state.cursor });
    this.later(() => this.poll(), PULL_INTERVAL_MS);
  }

  receive(msg) {
    if (!msg || typeof msg !== "object") return;
    // Answers go to every view of the model: a view takes only its own (and the writer's broadcasts).
    if (msg.id !== undefined && msg.id !== null && !String(msg.id).startsWith(`${this.viewId}:`)) return;
    if (msg.type === "reply") {
      const callback = this.pending.get(msg.id);
      this.pending.delete(msg.id);
      callback?.(msg);
      return;
    }
    this.updates += 1;
    this.dom.root.dataset.updates = String(this.updates); // read by the browser tests to measure the update rate
    if (msg.type === "snapshot") {
      this.syncing = false;
      this.replace(fromSnapshot(msg.state));
    } else if (msg.type === "delta") {
      if (!applyDelta(this.state, msg)) {
        if (!this.syncing) {
          this.syncing = true;
          this.request({ type: "sync" });
        }
        return;
      }
      this.render();
    }
  }

  replace(state) {
    this.state = state;
    this.render();
  }

  op(request, onReply) {
    this.request({ type: "op", ...request }, (reply) => {
      if (!reply.ok) this.flash(reply.message);
      onReply?.(reply);
    });
  }

  // -- drawing -----------------------------------------------------------------------------------------------

  skeleton() {
    const metric = h("select", { class: "rfnb-metric", title: "metric", onchange: (e) => this.set({ metric: e.target.value }) });
    const xAxis = h(
      "select",
      { class: "rfnb-x", title: "x axis", onchange: (e) => this.set({ xAxis: e.target.value }) },
      h("option", { value: "step" }, "steps"),
      h("option", { value: "samples" }, "samples seen"),
    );
    const logY = h("input", { type: "checkbox", class: "rfnb-logy", onchange: (e) => this.set({ logY: e.target.checked }) });
    const smoothing = h("input", {
      type: "range",
      class: "rfnb-smoothing",
      min: "0",
      max: "0.99",
      step: "0.01",
      value: "0",
      oninput: (e) => this.set({ smoothing: Number(e.target.value) }),
    });
    const dom = {
      title: h("span", { class: "rfnb-title" }),
      progress: h("div", { class: "rfnb-bar-fill" }),
      timing: h("span", { class: "rfnb-timing" }),
      counts: h("span", { class: "rfnb-counts" }),
      stopAll: h("button", { class: "rfnb-stop-all", onclick: () => this.op({ op: "stop_all" }) }, "Stop all"),
      message: h("div", { class: "rfnb-message", role: "status" }),
      metric,
      xAxis,
      logY,
      smoothing,
      legend: h("div", { class: "rfnb-legend" }),
      plot: h("div", { class: "rfnb-plot" }),
      table: h("table", { class: "rfnb-table" }),
      log: h("div", { class: "rfnb-log" }),
      alert: h("div", { class: "rfnb-alert", role: "alert", hidden: true }),
      overlay: h("div", { class: "rfnb-overlay", hidden: true }),
    };
    dom.root = h(
      "div",
      { class: "rfnb-root" },
      h(
        "div",
        { class: "rfnb-header" },
        dom.title,
        h("div", { class: "rfnb-bar" }, dom.progress),
        dom.timing,
        dom.counts,
        dom.stopAll,
      ),
      dom.alert,
      dom.message,
      h(
        "div",
        { class: "rfnb-controls" },
        h("label", {}, "metric ", metric),
        h("label", {}, "x ", xAxis),
        h("label", {}, logY, " log y"),
        h("label", {}, "smoothing ", smoothing),
      ),
      dom.legend,
      dom.plot,
      dom.table,
      h("details", { class: "rfnb-log-box", open: true }, h("summary", {}, "IC-op log"), dom.log),
      dom.overlay,
    );
    return dom;
  }

  set(change) {
    Object.assign(this.view, change);
    this.render();
  }

  flash(text) {
    this.dom.message.textContent = text ?? "";
  }

  render() {
    this.renderHeader();
    this.renderControls();
    this.renderLegend();
    this.renderTable();
    this.renderLog();
    this.draw();
  }

  renderHeader() {
    const { header, experiment } = this.state;
    const { dom } = this;
    dom.title.textContent = experiment || "experiment";
    const pct = Math.round((header.progress || 0) * 1000) / 10;
    dom.progress.style.width = `${pct}%`;
    const eta = header.done ? "done" : `ETA ${formatDuration(header.eta_s)}`;
    dom.timing.textContent = `${pct}% · ${formatDuration(header.elapsed_s)} elapsed · ${eta}`;
    dom.counts.replaceChildren(
      ...Object.entries(header.counts || {}).map(([status, n]) => h("span", { class: `rfnb-badge rfnb-${status}` }, `${n} ${status}`)),
    );
    dom.stopAll.disabled = !this.state.runs.some((r) => LIVE.has(r.status));
    const storage = header.storage_error;
    dom.alert.hidden = !storage;
    dom.alert.textContent = storage ? `Paused: ${storage}. Free space (or fix the folder), then Resume the runs.` : "";
  }

  renderControls() {
    const names = metricNames(this.state);
    if (names.length && !names.includes(this.view.metric)) this.view.metric = names[0];
    const current = [...this.dom.metric.options].map((o) => o.value).join("\n");
    if (current !== names.join("\n")) {
      this.dom.metric.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
    }
    this.dom.metric.value = this.view.metric;
  }

  renderLegend() {
    const key = JSON.stringify([this.state.runs.map((r) => [r.id, r.name, r.color]), this.view.highlight]);
    if (key === this.legendKey) return; // rebuilt only when it changes: a click never lands on a replaced node
    this.legendKey = key;
    this.dom.legend.replaceChildren(
      ...this.state.runs.map((run) =>
        h(
          "span",
          {
            class: `rfnb-chip${this.view.highlight === run.id ? " rfnb-highlight" : ""}`,
            "data-run": run.id,
            onclick: () => this.toggleHighlight(run.id),
          },
          h("span", { class: "rfnb-swatch", style: `background:${safeColor(run.color)}` }),
          run.name,
        ),
      ),
    );
  }

  toggleHighlight(runId) {
    this.set({ highlight: this.view.highlight === runId ? null : runId });
  }

  // Rows are kept per run and updated in place, so a button under the mouse is never replaced mid-click.
  renderTable() {
    const { params, runs } = this.state;
    const extra = this.extraMetric();
    const key = [extra, ...params].join("\n");
    if (key !== this.tableKey) {
      this.tableKey = key;
      this.rows = new Map();
      this.tbody = h("tbody");
      const metricTitles = ["train loss", "eval loss", ...(extra ? [extra] : [])];
      const titles = ["run", "status", "chunks", ...metricTitles, ...params.map(shortName), ""];
      this.dom.table.replaceChildren(h("thead", {}, h("tr", {}, titles.map((t) => h("th", {}, t)))), this.tbody);
    }
    const order = runs.map((run) => {
      const row = this.rows.get(run.id) ?? this.createRow(run);
      this.rows.set(run.id, row);
      this.updateRow(row, run);
      return row.tr;
    });
    const current = [...this.tbody.children];
    if (order.length !== current.length || order.some((tr, i) => tr !== current[i])) this.tbody.replaceChildren(...order);
  }

  /** The plotted metric gets a column of its own (reward, accuracy, ...) unless it is one of the two losses. */
  extraMetric() {
    const metric = this.view.metric;
    return metric && metric !== "loss" && metric !== "eval_loss" ? metric : null;
  }

  createRow(run) {
    const cell = () => h("td");
    const row = {
      name: h("span", { class: "rfnb-run-name" }),
      swatch: h("span", { class: "rfnb-swatch" }),
      error: h("div", { class: "rfnb-error", hidden: true }),
      warning: h("div", { class: "rfnb-warning", hidden: true }),
      status: h("span", { class: "rfnb-badge rfnb-status" }),
      chunks: h("td", { class: "rfnb-chunks" }),
      loss: cell(),
      evalLoss: cell(),
      extra: this.extraMetric() ? cell() : null,
      params: this.state.params.map(cell),
      primary: h("button", { onclick: () => this.primaryAction(run.id) }),
      del: h("button", { class: "rfnb-delete", onclick: () => this.askDelete(run.id) }, "Delete"),
      clone: h("button", { class: "rfnb-clone", onclick: () => this.openDialog(run.id) }, "Clone-Modify"),
      confirm: h(
        "span",
        { class: "rfnb-confirm-box", hidden: true },
        "Delete? ",
      ),
    };
    row.confirmYes = h("button", { class: "rfnb-confirm", onclick: () => this.deleteRun(run.id) }, "Yes, delete");
    row.confirmNo = h("button", { class: "rfnb-cancel", onclick: () => this.askDelete(null) }, "Cancel");
    row.confirm.append(row.confirmYes, row.confirmNo);
    row.tr = h(
      "tr",
      {
        class: "rfnb-row",
        "data-run": run.id,
        onclick: (e) => {
          if (!e.target.closest("button, input")) this.toggleHighlight(run.id);
        },
      },
      h("td", { class: "rfnb-name" }, row.swatch, row.name, row.error, row.warning),
      h("td", {}, row.status),
      row.chunks,
      row.loss,
      row.evalLoss,
      row.extra,
      ...row.params,
      h("td", { class: "rfnb-actions" }, row.primary, row.del, row.clone, row.confirm),
    );
    return row;
  }

  updateRow(row, run) {
    const text = (el, value) => {
      if (el.textContent !== value) el.textContent = value;
    };
    row.tr.dataset.status = run.status;
    row.tr.classList.toggle("rfnb-highlight", this.view.highlight === run.id);
    row.swatch.style.background = safeColor(run.color);
    text(row.name, run.name);
    const failed = run.status === "failed" && run.error;
    row.error.hidden = !failed;
    text(row.error, failed ? lastLine(run.error) : "");
    row.error.title = failed ? run.error : "";
    const warned = Boolean(run.warning); // e.g. a compute_metrics that raised (and may be why a run failed)
    row.warning.hidden = !warned;
    text(row.warning, warned ? run.warning : "");
    text(row.status, run.status);
    row.status.className = `rfnb-badge rfnb-status rfnb-${run.status}`;
    text(row.chunks, `${run.chunks_done} of ${run.chunks_total}`);
    text(row.loss, formatValue(run.latest?.loss));
    text(row.evalLoss, formatValue(run.latest?.eval_loss));
    if (row.extra) text(row.extra, formatValue(run.latest?.[this.extraMetric()]));
    this.state.params.forEach((p, i) => text(row.params[i], formatValue(run.params?.[p])));
    const stopped = run.status === "stopped";
    text(row.primary, stopped ? "Resume" : "Stop");
    row.primary.className = stopped ? "rfnb-resume" : "rfnb-stop";
    // Each button names its run to assistive technology: "Stop r=4, lr=3e-3", not one of many "Stop"s.
    const named = (el, action) => {
      const label = `${action} ${run.name}`;
      if (el.getAttribute("aria-label") !== label) el.setAttribute("aria-label", label);
    };
    named(row.primary, stopped ? "Resume" : "Stop");
    named(row.del, "Delete");
    named(row.clone, "Clone-Modify");
    named(row.confirmYes, "Yes, delete");
    named(row.confirmNo, "Cancel deleting");
    row.primary.disabled = !(stopped || LIVE.has(run.status));
    row.del.disabled = run.status === "deleted";
    row.clone.disabled = run.status === "deleted";
    const confirming = this.confirmDelete === run.id;
    row.confirm.hidden = !confirming;
    for (const b of [row.primary, row.del, row.clone]) b.hidden = confirming;
  }

  primaryAction(runId) {
    const run = this.state.runs.find((r) => r.id === runId);
    if (run) this.op({ op: run.status === "stopped" ? "resume" : "stop", run_id: runId });
  }

  askDelete(runId) {
    this.confirmDelete = runId;
    this.renderTable();
  }

  deleteRun(runId) {
    this.confirmDelete = null;
    this.op({ op: "delete", run_id: runId });
    this.renderTable();
  }

  renderLog() {
    const ops = this.state.ops.slice().reverse();
    this.dom.log.replaceChildren(
      ...ops.map((op) =>
        h(
          "div",
          { class: `rfnb-op rfnb-op-${op.outcome}` },
          h("span", { class: "rfnb-op-time" }, clock(op.time)),
          ` ${op.op}`,
          op.run_id !== null && op.run_id !== undefined ? ` run ${op.run_id}` : "",
          op.new_run_id ? ` → run ${op.new_run_id}` : "",
          ` (${op.origin}) `,
          h("b", {}, op.outcome),
          op.step !== null && op.step !== undefined ? ` at step ${op.step}` : "",
          op.reason ? `: ${op.reason}` : "",
        ),
      ),
    );
  }

  draw() {
    if (!this.plot) return;
    const runs = this.state.runs.map((run) => ({ run, ...curveFor(this.state, run, this.view.metric, this.view) }));
    const highlighted = this.state.runs.find((r) => r.id === this.view.highlight) ?? this.state.runs[0];
    const scale = this.view.xAxis === "samples" ? highlighted?.samples_per_step || 1 : 1;
    const boundaries = highlighted ? (this.state.boundaries[String(highlighted.id)] ?? []).map((s) => s * scale) : [];
    this.plot.update({
      runs,
      params: this.state.params,
      metric: this.view.metric,
      xAxis: this.view.xAxis,
      logY: this.view.logY,
      highlight: this.view.highlight,
      boundaries,
    });
  }

  // -- Clone-Modify ------------------------------------------------------------------------------------------

  openDialog(runId) {
    const run = this.state.runs.find((r) => r.id === runId);
    if (!run) return;
    const fields = [];
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
    const list = h("div", { class: "rfnb-fields" });
    for (const path of this.state.params) {
      if (path in (run.params ?? {})) addField(shortName(path), JSON.stringify(run.params[path]), true);
    }
    const warm = h("input", { type: "checkbox", class: "rfnb-warm" });
    const titleId = `rfnb-dialog-title-${++dialogCount}`;
    const error = h("div", { class: "rfnb-dialog-error", role: "alert" });
    const submit = h("button", { class: "rfnb-submit" }, "Submit");
    const close = () => {
      this.dialog = null;
      this.dom.overlay.hidden = true;
      this.dom.overlay.replaceChildren();
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
      this.request({ type: "op", op: "clone_modify", run_id: run.id, overrides, warm_start: warm.checked }, (reply) => {
        submit.disabled = false;
        if (reply.ok) close();
        else error.textContent = reply.message;
      });
    });
    this.dialog = h(
      "div",
      { class: "rfnb-dialog", role: "dialog", "aria-modal": "true", "aria-labelledby": titleId },
      h("div", { class: "rfnb-dialog-title", id: titleId }, `Clone-Modify: ${run.name}`),
      list,
      h("button", { class: "rfnb-add-field", "aria-label": "add a field", onclick: () => addField().focus() }, "+ field"),
      h("label", { class: "rfnb-warm-label" }, warm, " Warm start (continue from this run's weights, optimizer and step)"),
      error,
      h("div", { class: "rfnb-dialog-buttons" }, submit, h("button", { class: "rfnb-dialog-cancel", onclick: close }, "Cancel")),
    );
    this.dom.overlay.replaceChildren(this.dialog);
    this.dom.overlay.hidden = false;
  }
}

/** A typed value from a form field: JSON when it parses (3e-4, 16, true, "x", [..]), the text otherwise. */
export function parseValue(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Only `#rgb` / `#rrggbb` colours reach a style attribute. */
export function safeColor(color) {
  return /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.test(String(color)) ? color : "#888888";
}

function lastLine(text) {
  const lines = String(text).trim().split("\n");
  return lines[lines.length - 1].slice(0, 300);
}

function clock(seconds) {
  if (!Number.isFinite(seconds)) return "";
  return new Date(seconds * 1000).toTimeString().slice(0, 8);
}

export { emptyState };
