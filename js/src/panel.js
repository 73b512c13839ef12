// The panel: the composition root. It lays out the DOM, keeps the state (state.js) and the view settings, and
// wires the parts to the kernel (protocol.js): header.js, table.js, dialog.js, oplog.js and the plot.
// The plot is created by `plotFactory` (Bokeh in the bundle, a fake in the tests); messages that arrive before
// it is ready only update the state, which is drawn once the plot exists.

import { openCloneDialog } from "./dialog.js";
import { h } from "./dom.js";
import { Legend, renderControls, renderHeader } from "./header.js";
import { renderLog } from "./oplog.js";
import { Channel } from "./protocol.js";
import { applyDelta, curveFor, fromSnapshot } from "./state.js";
import { RunTable } from "./table.js";

export class Panel {
  constructor(model, el, { plotFactory, setTimeout: later = (fn, ms) => globalThis.setTimeout(fn, ms) } = {}) {
    this.model = model;
    this.el = el;
    this.state = fromSnapshot(model.get("snapshot"));
    this.view = { metric: "loss", xAxis: "step", logY: false, smoothing: 0, highlight: null };
    this.plot = null;
    this.disposed = false;

    this.channel = new Channel(model, {
      cursor: () => this.state.cursor,
      onSnapshot: (snapshot) => this.replace(fromSnapshot(snapshot)),
      onDelta: (delta) => {
        if (!applyDelta(this.state, delta)) return false;
        this.render();
        return true;
      },
      onUpdate: (n) => {
        this.dom.root.dataset.updates = String(n); // read by the browser tests to measure the update rate
      },
      later,
    });

    el.classList.add("rfnb");
    this.dom = this.skeleton();
    el.replaceChildren(this.dom.root);
    this.legend = new Legend(this.dom.legend, (runId) => this.toggleHighlight(runId));
    this.table = new RunTable(this.dom.table, {
      op: (request) => this.op(request),
      clone: (runId) => this.openDialog(runId),
      highlight: (runId) => this.toggleHighlight(runId),
    });
    this.render();
    this.channel.start();

    this.plotReady = Promise.resolve(plotFactory ? plotFactory(this.dom.plot) : null).then((plot) => {
      if (this.disposed) return;
      this.plot = plot;
      this.draw();
    });
  }

  dispose() {
    this.disposed = true;
    this.channel.dispose();
    this.plot?.dispose?.();
  }

  replace(state) {
    this.state = state;
    this.render();
  }

  /** Send an IC op; a refusal shows above the curves. */
  op(request, onReply) {
    this.channel.request({ type: "op", ...request }, (reply) => {
      if (!reply.ok) this.flash(reply.message);
      onReply?.(reply);
    });
  }

  openDialog(runId) {
    const run = this.state.runs.find((r) => r.id === runId);
    if (run) openCloneDialog(this.dom.overlay, run, this.state.params, (msg, onReply) => this.channel.request(msg, onReply));
  }

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
      notice: h("div", { class: "rfnb-notice", role: "status", hidden: true }),
      overlay: h("div", { class: "rfnb-overlay", hidden: true }),
    };
    dom.root = h(
      "div",
      { class: "rfnb-root" },
      h("div", { class: "rfnb-header" }, dom.title, h("div", { class: "rfnb-bar" }, dom.progress), dom.timing, dom.counts, dom.stopAll),
      dom.alert,
      dom.notice,
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

  toggleHighlight(runId) {
    this.set({ highlight: this.view.highlight === runId ? null : runId });
  }

  flash(text) {
    this.dom.message.textContent = text ?? "";
  }

  render() {
    renderHeader(this.dom, this.state);
    renderControls(this.dom, this.state, this.view);
    this.legend.render(this.state.runs, this.view.highlight);
    this.table.render(this.state, this.view);
    renderLog(this.dom.log, this.state.ops);
    this.draw();
  }

  draw() {
    if (!this.plot) return;
    const { state, view } = this;
    const runs = state.runs.map((run) => ({ run, ...curveFor(state, run, view.metric, view) }));
    const highlighted = state.runs.find((r) => r.id === view.highlight) ?? state.runs[0];
    const scale = view.xAxis === "samples" ? highlighted?.samples_per_step || 1 : 1;
    const boundaries = highlighted ? (state.boundaries[String(highlighted.id)] ?? []).map((s) => s * scale) : [];
    this.plot.update({
      runs,
      params: state.params,
      metric: view.metric,
      xAxis: view.xAxis,
      logY: view.logY,
      highlight: view.highlight,
      boundaries,
    });
  }
}
