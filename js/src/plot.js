// The curves: one Bokeh figure, one line per run (colour from the kernel, stable per run id), a hover with the
// run's name, step, value and varying hyper-parameters, dotted vertical lines at chunk boundaries. A new figure is built
// only when the metric, the x axis or the y scale changes; otherwise each update replaces the sources' data.

import { figure, show } from "@bokeh/bokehjs/build/js/lib/api/plotting.js";
import { ColumnDataSource, HoverTool } from "@bokeh/bokehjs/build/js/lib/models/index.js";
import { formatValue, shortName } from "./format.js";

export async function bokehPlot(el) {
  let current = null; // {key, fig, view, hover, bounds, lines: Map(runId -> {source, renderer})}
  let queued = null;
  let drawing = false;

  async function build(spec) {
    if (current) current.view.remove();
    const fig = figure({
      height: 320,
      sizing_mode: "stretch_width",
      x_axis_label: spec.xAxis === "samples" ? "samples seen" : "step",
      y_axis_label: spec.metric,
      y_axis_type: spec.logY ? "log" : "linear",
      tools: "pan,wheel_zoom,box_zoom,reset,save",
      toolbar_location: "right",
      output_backend: "canvas",
    });
    fig.min_border_left = 50;
    const lines = new Map();
    const hover = new HoverTool({
      tooltips: [
        ["run", "@name"],
        ["step", "@step"],
        [spec.metric, "@raw{0.0000}"],
        ["params", "@params"],
      ],
      line_policy: "nearest",
      renderers: [],
    });
    fig.add_tools(hover);
    const bounds = new ColumnDataSource({ data: { x: [] } });
    fig.vspan({ field: "x" }, { source: bounds, line_dash: "dotted", line_alpha: 0.5, line_color: "#888888" });
    current = { key: specKey(spec), fig, lines, bounds, hover, view: null };
    current.view = await show(fig, el);
  }

  function line(runId, color) {
    let entry = current.lines.get(runId);
    if (!entry) {
      const source = new ColumnDataSource({ data: { x: [], y: [], step: [], raw: [], name: [], params: [] } });
      const renderer = current.fig.line({ field: "x" }, { field: "y" }, { source, line_color: color, line_width: 2 });
      current.hover.renderers = [...current.hover.renderers, renderer];
      entry = { source, renderer };
      current.lines.set(runId, entry);
    }
    return entry;
  }

  function fill(spec) {
    for (const { run, x, y, steps, raw } of spec.runs) {
      const { source, renderer } = line(run.id, run.color);
      const params = spec.params.map((p) => `${shortName(p)}=${formatValue(run.params?.[p])}`).join(", ");
      const keep = y.map((v) => v !== null && (!spec.logY || v > 0));
      const pick = (arr) => arr.filter((_, i) => keep[i]);
      source.data = {
        x: pick(x),
        y: pick(y),
        step: pick(steps),
        raw: pick(raw),
        name: pick(x).map(() => run.name),
        params: pick(x).map(() => params),
      };
      const dim = spec.highlight !== null && spec.highlight !== run.id;
      renderer.glyph.line_width = spec.highlight === run.id ? 4 : 2;
      renderer.glyph.line_alpha = dim ? 0.2 : 1;
      renderer.visible = run.status !== "deleted";
    }
    current.bounds.data = { x: spec.boundaries };
    // What each line holds, for the browser tests: {run id: points drawn}.
    el.dataset.points = JSON.stringify(Object.fromEntries([...current.lines].map(([id, l]) => [id, l.source.get_length() ?? 0])));
  }

  async function drain() {
    if (drawing) return;
    drawing = true;
    try {
      while (queued) {
        const spec = queued;
        queued = null;
        if (!current || current.key !== specKey(spec)) await build(spec);
        fill(spec);
      }
    } finally {
      drawing = false;
    }
  }

  return {
    update(spec) {
      queued = spec; // only the newest state matters
      drain();
    },
    dispose() {
      current?.view.remove();
      current = null;
    },
  };
}

function specKey(spec) {
  return `${spec.metric}|${spec.xAxis}|${spec.logY}`;
}
