// How values, durations and names are shown: the one place for it in the browser (the static HTML's rule is
// rf_notebook/_panel_spec.py `display_value`, the same cases).

/** The value of a hyper-parameter or metric for display: 3e-4, 0.1, 16, "cosine", [q, v] -> "q, v". */
export function formatValue(value) {
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    const a = Math.abs(value);
    if (a !== 0 && (a < 1e-2 || a >= 1e5)) return value.toExponential(2).replace(/\.?0+e/, "e").replace("e+", "e");
    return String(Number(value.toPrecision(3)));
  }
  if (value === null || value === undefined) return "";
  if (Array.isArray(value)) return value.map(formatValue).join(", ");
  return String(value);
}

/** A duration as h:mm:ss or m:ss. */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/** A Unix time as the local hh:mm:ss, "" when there is none. */
export function formatClock(seconds) {
  if (!Number.isFinite(seconds)) return "";
  return new Date(seconds * 1000).toTimeString().slice(0, 8);
}

/** The last part of a dotted parameter path: "training_args.learning_rate" -> "learning_rate". */
export function shortName(path) {
  return path.slice(path.lastIndexOf(".") + 1);
}

/** The last line of a traceback (it names the exception), at most 300 characters. */
export function lastLine(text) {
  const lines = String(text).trim().split("\n");
  return lines[lines.length - 1].slice(0, 300);
}
