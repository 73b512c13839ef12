// The IC-op log: every op the kernel reports (the latest first), its outcome and, when refused, why.

import { h } from "./dom.js";
import { formatClock } from "./format.js";

export function renderLog(el, ops) {
  el.replaceChildren(
    ...ops
      .slice()
      .reverse()
      .map((op) =>
        h(
          "div",
          { class: `rfnb-op rfnb-op-${op.outcome}` },
          h("span", { class: "rfnb-op-time" }, formatClock(op.time)),
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
