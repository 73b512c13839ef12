// The panel's state: the kernel's snapshot plus the deltas that followed it (protocol: js/README.md).
// Pure data, no DOM and no Bokeh, so it can be tested on its own.

// The browser's own bound per curve (the kernel bounds a snapshot's curves, rf_notebook/_panel_spec.py
// SNAPSHOT_MAX_POINTS, but deltas then add every new point): beyond it, every other point is dropped.
export const MAX_POINTS = 2000;

// Which statuses are live (the run may still train, so it can be stopped) comes with every message as
// `live_statuses`; this is the answer for a message without it (a snapshot saved by an older version).
export const FALLBACK_LIVE_STATUSES = ["queued", "training"];

export function emptyState() {
  return {
    experiment: "",
    cursor: 0,
    header: { elapsed_s: 0, eta_s: null, progress: 0, done: false, counts: {} },
    params: [],
    runs: [],
    series: {},
    boundaries: {},
    ops: [],
    live_statuses: FALLBACK_LIVE_STATUSES,
  };
}

/** A state from a complete snapshot (the synced trait, or a `snapshot` message). */
export function fromSnapshot(snapshot) {
  const state = emptyState();
  if (!snapshot || typeof snapshot !== "object" || !Array.isArray(snapshot.runs)) return state;
  Object.assign(state, {
    experiment: String(snapshot.experiment ?? ""),
    cursor: Number(snapshot.cursor) || 0,
    header: snapshot.header ?? state.header,
    params: snapshot.params ?? [],
    runs: snapshot.runs,
    boundaries: snapshot.boundaries ?? {},
    ops: snapshot.ops ?? [],
    live_statuses: snapshot.live_statuses ?? FALLBACK_LIVE_STATUSES,
  });
  for (const [runId, curves] of Object.entries(snapshot.series ?? {})) {
    for (const [metric, points] of Object.entries(curves)) appendPoints(state, runId, metric, points);
  }
  return state;
}

/**
 * Apply a delta in place. Returns false (and changes nothing) when the delta does not start at this state's
 * cursor: the caller then asks the kernel for a snapshot.
 */
export function applyDelta(state, delta) {
  if (delta.from !== state.cursor) {
    if (delta.to <= state.cursor) return true; // points already here (a pull answered twice)
    return false;
  }
  state.cursor = delta.to;
  state.header = delta.header;
  state.params = delta.params;
  state.runs = delta.runs;
  state.boundaries = delta.boundaries;
  state.ops = delta.ops;
  state.live_statuses = delta.live_statuses ?? state.live_statuses;
  for (const [runId, curves] of Object.entries(delta.series ?? {})) {
    for (const [metric, points] of Object.entries(curves)) appendPoints(state, runId, metric, points);
  }
  return true;
}

// A curve is an array of [step, value] points with `stride` (it keeps one logged point in `stride`) and `tail`
// (the newest point when it fell between two kept ones, so the line always reaches the latest value).
function appendPoints(state, runId, metric, points) {
  const curves = (state.series[runId] ??= {});
  const curve = (curves[metric] ??= Object.assign([], { stride: 1, seen: 0, tail: null }));
  for (const point of points) {
    if (curve.seen % curve.stride === 0) {
      curve.push(point);
      curve.tail = null;
    } else {
      curve.tail = point;
    }
    curve.seen += 1;
  }
  if (curve.length > MAX_POINTS) thin(curve);
}

/** Keep every other point and double the stride: bounded memory however long a run trains, and the same
 * density along the whole curve, old and new. */
export function thin(curve) {
  let kept = 0;
  for (let i = 0; i < curve.length; i += 2) curve[kept++] = curve[i];
  curve.length = kept;
  curve.stride *= 2;
  return curve;
}

/** Whether `run` may still train (and so be stopped), by the kernel's list of live statuses. */
export function isLive(state, run) {
  return state.live_statuses.includes(run.status);
}

/** The points of a curve to draw: the kept ones and the newest. */
export function pointsOf(curve) {
  if (!curve) return [];
  return curve.tail ? [...curve, curve.tail] : curve;
}

/** Every metric name logged by any run, train loss first, then train metrics, then eval metrics. */
export function metricNames(state) {
  const names = new Set();
  for (const curves of Object.values(state.series)) for (const name of Object.keys(curves)) names.add(name);
  const rank = (n) => (n === "loss" ? 0 : n === "eval_loss" ? 2 : n.startsWith("eval_") ? 3 : 1);
  return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

/** Exponential moving average as in TensorBoard (`weight` 0 = raw); null values stay gaps. */
export function smooth(values, weight) {
  if (!(weight > 0)) return values.slice();
  const out = [];
  let last = null;
  let debias = 0;
  for (const v of values) {
    if (v === null || !Number.isFinite(v)) {
      out.push(null);
      continue;
    }
    last = last === null ? (1 - weight) * v : weight * last + (1 - weight) * v;
    debias = weight * debias + (1 - weight);
    out.push(last / debias);
  }
  return out;
}

/** One run's curve for the plot: x in steps or samples seen, y smoothed. */
export function curveFor(state, run, metric, { xAxis = "step", smoothing = 0 } = {}) {
  const points = pointsOf(state.series[String(run.id)]?.[metric]);
  const scale = xAxis === "samples" ? run.samples_per_step || 1 : 1;
  const steps = points.map((p) => p[0]);
  return { x: steps.map((s) => s * scale), y: smooth(points.map((p) => p[1]), smoothing), steps, raw: points.map((p) => p[1]) };
}
