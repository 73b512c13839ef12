// The run table: one row per run (swatch, name, error or warning, status, chunks, losses, the plotted metric,
// the varying hyper-parameters) with its Stop/Resume, Delete (after a confirmation) and Clone-Modify buttons.
// Rows are kept per run and updated in place, so a button under the mouse is never replaced mid-click.

import { h, safeColor, setText } from "./dom.js";
import { formatValue, lastLine, shortName } from "./format.js";
import { isLive } from "./state.js";

export class RunTable {
  /** `actions`: op(request) sends an op, clone(runId) opens the dialog, highlight(runId) toggles a highlight. */
  constructor(table, actions) {
    this.table = table;
    this.actions = actions;
    this.confirmDelete = null; // run id whose Delete waits for confirmation
    this.key = null;
    this.rows = new Map();
    this.tbody = null;
  }

  render(state, view) {
    this.state = state;
    this.view = view;
    const extra = this.extraMetric();
    const key = [extra, ...state.params].join("\n");
    if (key !== this.key) {
      this.key = key;
      this.rows = new Map();
      this.tbody = h("tbody");
      const metricTitles = ["train loss", "eval loss", ...(extra ? [extra] : [])];
      const titles = ["run", "status", "chunks", ...metricTitles, ...state.params.map(shortName), ""];
      this.table.replaceChildren(h("thead", {}, h("tr", {}, titles.map((t) => h("th", {}, t)))), this.tbody);
    }
    const order = state.runs.map((run) => {
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
      clone: h("button", { class: "rfnb-clone", onclick: () => this.actions.clone(run.id) }, "Clone-Modify"),
      confirm: h("span", { class: "rfnb-confirm-box", hidden: true }, "Delete? "),
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
          if (!e.target.closest("button, input")) this.actions.highlight(run.id);
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
    row.tr.dataset.status = run.status;
    row.tr.classList.toggle("rfnb-highlight", this.view.highlight === run.id);
    row.swatch.style.background = safeColor(run.color);
    setText(row.name, run.name);
    const failed = run.status === "failed" && run.error;
    row.error.hidden = !failed;
    setText(row.error, failed ? lastLine(run.error) : "");
    row.error.title = failed ? run.error : "";
    const warned = Boolean(run.warning); // e.g. a compute_metrics that raised (and may be why a run failed)
    row.warning.hidden = !warned;
    setText(row.warning, warned ? run.warning : "");
    setText(row.status, run.status);
    row.status.className = `rfnb-badge rfnb-status rfnb-${run.status}`;
    setText(row.chunks, `${run.chunks_done} of ${run.chunks_total}`);
    setText(row.loss, formatValue(run.latest?.loss));
    setText(row.evalLoss, formatValue(run.latest?.eval_loss));
    if (row.extra) setText(row.extra, formatValue(run.latest?.[this.extraMetric()]));
    this.state.params.forEach((p, i) => setText(row.params[i], formatValue(run.params?.[p])));
    const stopped = run.status === "stopped";
    setText(row.primary, stopped ? "Resume" : "Stop");
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
    row.primary.disabled = !(stopped || isLive(this.state, run));
    row.del.disabled = run.status === "deleted";
    row.clone.disabled = run.status === "deleted";
    const confirming = this.confirmDelete === run.id;
    row.confirm.hidden = !confirming;
    for (const b of [row.primary, row.del, row.clone]) b.hidden = confirming;
  }

  primaryAction(runId) {
    const run = this.state.runs.find((r) => r.id === runId);
    if (run) this.actions.op({ op: run.status === "stopped" ? "resume" : "stop", run_id: runId });
  }

  askDelete(runId) {
    this.confirmDelete = runId;
    this.render(this.state, this.view);
  }

  deleteRun(runId) {
    this.confirmDelete = null;
    this.actions.op({ op: "delete", run_id: runId });
    this.render(this.state, this.view);
  }
}
