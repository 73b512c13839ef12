// Above the curves: the header line (title, progress, timing, status counts, Stop all, a storage alert, notices), the
// metric select and the legend, whose chips highlight a run.

import { h, safeColor } from "./dom.js";
import { formatDuration } from "./format.js";
import { isLive, metricNames } from "./state.js";

export function renderHeader(dom, state) {
  const { header, experiment } = state;
  dom.title.textContent = experiment || "experiment";
  const pct = Math.round((header.progress || 0) * 1000) / 10;
  dom.progress.style.width = `${pct}%`;
  const eta = header.done ? "done" : `ETA ${formatDuration(header.eta_s)}`;
  dom.timing.textContent = `${pct}% · ${formatDuration(header.elapsed_s)} elapsed · ${eta}`;
  dom.counts.replaceChildren(
    ...Object.entries(header.counts || {}).map(([status, n]) => h("span", { class: `rfnb-badge rfnb-${status}` }, `${n} ${status}`)),
  );
  dom.stopAll.disabled = !state.runs.some((r) => isLive(state, r));
  const storage = header.storage_error;
  dom.alert.hidden = !storage;
  dom.alert.textContent = storage ? `Paused: ${storage}. Free space (or fix the folder), then Resume the runs.` : "";
  const notices = header.notices || []; // trouble that ends no run, e.g. a tracker that cannot be reached
  dom.notice.hidden = !notices.length;
  dom.notice.textContent = notices.join("\n");
}

/** The metric select lists every logged metric; `view.metric` falls back to the first when it has none. */
export function renderControls(dom, state, view) {
  const names = metricNames(state);
  if (names.length && !names.includes(view.metric)) view.metric = names[0];
  const current = [...dom.metric.options].map((o) => o.value).join("\n");
  if (current !== names.join("\n")) dom.metric.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
  dom.metric.value = view.metric;
}

export class Legend {
  constructor(el, onToggle) {
    this.el = el;
    this.onToggle = onToggle;
    this.key = null;
  }

  render(runs, highlight) {
    const key = JSON.stringify([runs.map((r) => [r.id, r.name, r.color]), highlight]);
    if (key === this.key) return; // rebuilt only when it changes: a click never lands on a replaced node
    this.key = key;
    this.el.replaceChildren(
      ...runs.map((run) =>
        h(
          "span",
          {
            class: `rfnb-chip${highlight === run.id ? " rfnb-highlight" : ""}`,
            "data-run": run.id,
            onclick: () => this.onToggle(run.id),
          },
          h("span", { class: "rfnb-swatch", style: `background:${safeColor(run.color)}` }),
          run.name,
        ),
      ),
    );
  }
}
