import { describe, expect, it, vi } from "vitest";
import { Panel } from "../src/panel.js";
import { formatValue } from "../src/format.js";
import { MAX_POINTS, applyDelta, curveFor, fromSnapshot, isLive, pointsOf, smooth } from "../src/state.js";

/** An anywidget model stand-in: traits, custom messages both ways. */
function fakeModel(traits = {}) {
  const handlers = {};
  return {
    traits: { snapshot: {}, mode: "push", ...traits },
    sent: [],
    get(name) {
      return this.traits[name];
    },
    on(event, fn) {
      (handlers[event] ??= []).push(fn);
    },
    off(event, fn) {
      handlers[event] = (handlers[event] ?? []).filter((f) => f !== fn);
    },
    send(msg) {
      this.sent.push(msg);
    },
    emit(msg) {
      for (const fn of handlers["msg:custom"] ?? []) fn(msg);
    },
  };
}

function run(id, extra = {}) {
  return {
    id,
    name: `run ${id}`,
    status: "training",
    trainer_type: "SFT",
    step: 2,
    total_steps: 8,
    chunks_done: 1,
    chunks_total: 4,
    error: null,
    params: { "training_args.learning_rate": id * 1e-3, "peft_config.r": 8 },
    samples_per_step: 16,
    latest: { loss: 1.5 },
    color: "#1f77b4",
    ...extra,
  };
}

function snapshot(runs, series = {}, cursor = 0) {
  return {
    v: 1,
    experiment: "demo",
    cursor,
    header: { elapsed_s: 3, eta_s: 9, progress: 0.25, done: false, counts: { training: runs.length } },
    params: ["training_args.learning_rate"],
    runs,
    series,
    boundaries: {},
    ops: [],
  };
}

function delta(from, to, runs, series) {
  const { header, params, boundaries, ops } = snapshot(runs);
  return { type: "delta", from, to, header, params, runs, boundaries, ops, series };
}

function fakePlot() {
  const plot = { updates: [], update: (spec) => plot.updates.push(spec) };
  return plot;
}

function mount(model, plotFactory = () => fakePlot()) {
  const el = document.createElement("div");
  document.body.append(el);
  const panel = new Panel(model, el, { plotFactory, setTimeout: () => {} });
  return { el, panel };
}

const row = (el, id) => el.querySelector(`tr[data-run="${id}"]`);
const lastOp = (model) => model.sent.filter((m) => m.type === "op").at(-1);

describe("panel", () => {
  it("asks for a snapshot at start and replaces its state with the answer", () => {
    const model = fakeModel();
    const { el } = mount(model);
    expect(model.sent[0].type).toBe("sync");
    model.emit({ type: "snapshot", id: model.sent[0].id, state: snapshot([run(1), run(2)]) });
    expect(el.querySelectorAll("tbody tr")).toHaveLength(2);
    expect(el.querySelector(".rfnb-title").textContent).toBe("demo");
  });

  it("buffers messages that arrive before Bokeh is ready and draws them all once it is", async () => {
    const model = fakeModel();
    let ready;
    const plot = fakePlot();
    const { panel } = mount(model, () => new Promise((resolve) => (ready = resolve)));
    model.emit({ type: "snapshot", state: snapshot([run(1)], { 1: { loss: [[1, 2.0]] } }, 1) });
    model.emit(delta(1, 3, [run(1)], { 1: { loss: [[2, 1.5], [3, 1.2]] } }));
    expect(plot.updates).toHaveLength(0);
    ready(plot);
    await panel.plotReady;
    const last = plot.updates.at(-1);
    expect(last.metric).toBe("loss");
    expect(last.runs[0].steps).toEqual([1, 2, 3]);
    expect(last.runs[0].y).toEqual([2.0, 1.5, 1.2]);
  });

  it("ignores answers meant for another view of the same model", () => {
    const model = fakeModel();
    const { el } = mount(model);
    model.emit({ type: "snapshot", id: "someone-else:1", state: snapshot([run(1), run(2)]) });
    expect(el.querySelectorAll("tbody tr")).toHaveLength(0);
    model.emit({ type: "snapshot", id: model.sent[0].id, state: snapshot([run(1)]) });
    expect(el.querySelectorAll("tbody tr")).toHaveLength(1);
  });

  it("asks for a snapshot when a delta does not continue its state", () => {
    const model = fakeModel();
    mount(model);
    model.emit({ type: "snapshot", state: snapshot([run(1)], {}, 5) });
    const before = model.sent.length;
    model.emit(delta(7, 9, [run(1)], {}));
    expect(model.sent.slice(before).map((m) => m.type)).toEqual(["sync"]);
    model.emit(delta(8, 10, [run(1)], {})); // a second gap while syncing: no second request
    expect(model.sent.slice(before)).toHaveLength(1);
  });

  it("sends stop, resume and (after confirmation) delete for the row's run", () => {
    const model = fakeModel();
    const { el } = mount(model);
    model.emit({ type: "snapshot", state: snapshot([run(1), run(2, { status: "stopped" })]) });
    row(el, 1).querySelector("button.rfnb-stop").click();
    expect(lastOp(model)).toMatchObject({ type: "op", op: "stop", run_id: 1 });
    row(el, 2).querySelector("button.rfnb-resume").click();
    expect(lastOp(model)).toMatchObject({ op: "resume", run_id: 2 });
    const ops = model.sent.length;
    row(el, 1).querySelector("button.rfnb-delete").click();
    expect(model.sent).toHaveLength(ops); // nothing sent before the confirmation
    row(el, 1).querySelector("button.rfnb-confirm").click();
    expect(lastOp(model)).toMatchObject({ op: "delete", run_id: 1 });
  });

  it("keeps a row's buttons across updates, so a click is never lost to a redraw", () => {
    const model = fakeModel();
    const { el } = mount(model);
    model.emit({ type: "snapshot", state: snapshot([run(1)], {}, 0) });
    const button = row(el, 1).querySelector("button.rfnb-stop");
    model.emit(delta(0, 1, [run(1, { step: 3 })], { 1: { loss: [[3, 1.0]] } }));
    expect(row(el, 1).querySelector("button.rfnb-stop")).toBe(button);
    model.emit(delta(1, 1, [run(1, { status: "stopped" })], {}));
    expect(button.textContent).toBe("Resume");
    expect(row(el, 1).querySelector(".rfnb-status").textContent).toBe("stopped");
  });

  it("shows a refusal from the kernel", () => {
    const model = fakeModel();
    const { el } = mount(model);
    model.emit({ type: "snapshot", state: snapshot([run(1)]) });
    row(el, 1).querySelector("button.rfnb-stop").click();
    model.emit({ type: "reply", id: lastOp(model).id, ok: false, message: "run 1 is already stopped" });
    expect(el.querySelector(".rfnb-message").textContent).toBe("run 1 is already stopped");
  });

  it("clone-modify: a form pre-filled with the varying values, sends only what changed, shows errors", () => {
    const model = fakeModel();
    const { el } = mount(model);
    model.emit({ type: "snapshot", state: snapshot([run(1), run(2)]) });
    row(el, 2).querySelector("button.rfnb-clone").click();
    const dialog = el.querySelector(".rfnb-dialog");
    const [name] = dialog.querySelectorAll(".rfnb-field-name");
    const [value] = dialog.querySelectorAll(".rfnb-field-value");
    expect(name.value).toBe("learning_rate");
    expect(JSON.parse(value.value)).toBeCloseTo(0.002);
    value.value = "1e-4";
    dialog.querySelector(".rfnb-add-field").click();
    const names = dialog.querySelectorAll(".rfnb-field-name");
    const values = dialog.querySelectorAll(".rfnb-field-value");
    names[1].value = "lr_scheduler_type";
    values[1].value = "cosine";
    dialog.querySelector(".rfnb-warm").checked = true;
    dialog.querySelector(".rfnb-submit").click();
    const request = lastOp(model);
    expect(request).toMatchObject({
      op: "clone_modify",
      run_id: 2,
      overrides: { learning_rate: 1e-4, lr_scheduler_type: "cosine" },
      warm_start: true,
    });
    model.emit({ type: "reply", id: request.id, ok: false, message: "warm start cannot change r" });
    expect(el.querySelector(".rfnb-dialog-error").textContent).toBe("warm start cannot change r");
    dialog.querySelector(".rfnb-submit").click();
    model.emit({ type: "reply", id: lastOp(model).id, ok: true, run_id: 3 });
    expect(el.querySelector(".rfnb-dialog")).toBeNull();
  });

  it("names every row button after its run and labels each form value with its field", () => {
    const model = fakeModel();
    const { el } = mount(model);
    model.emit({ type: "snapshot", state: snapshot([run(1), run(2, { status: "stopped" })]) });
    const label = (sel) => el.querySelector(sel).getAttribute("aria-label");
    expect(label('tr[data-run="1"] button.rfnb-stop')).toBe("Stop run 1");
    expect(label('tr[data-run="2"] button.rfnb-resume')).toBe("Resume run 2");
    expect(label('tr[data-run="1"] button.rfnb-delete')).toBe("Delete run 1");
    expect(label('tr[data-run="1"] button.rfnb-confirm')).toBe("Yes, delete run 1");
    model.emit({ type: "snapshot", state: snapshot([run(1, { status: "stopped" }), run(2)]) });
    expect(label('tr[data-run="1"] button.rfnb-resume')).toBe("Resume run 1"); // follows the status
    row(el, 2).querySelector("button.rfnb-clone").click();
    expect(label('tr[data-run="2"] button.rfnb-clone')).toBe("Clone-Modify run 2");
    const dialog = el.querySelector(".rfnb-dialog");
    const title = dialog.querySelector(".rfnb-dialog-title");
    expect(dialog.getAttribute("aria-labelledby")).toBe(title.id);
    expect(dialog.querySelector(".rfnb-field-value").getAttribute("aria-label")).toBe("learning_rate");
    dialog.querySelector(".rfnb-add-field").click();
    const [, name] = dialog.querySelectorAll(".rfnb-field-name");
    const [, value] = dialog.querySelectorAll(".rfnb-field-value");
    expect(document.activeElement).toBe(name);
    expect(value.getAttribute("aria-label")).toBe("new field 2 value");
    name.value = "weight_decay";
    name.dispatchEvent(new Event("input"));
    expect(value.getAttribute("aria-label")).toBe("weight_decay");
  });

  it("shows a run's warning (a compute_metrics that raised) while it trains on", () => {
    const model = fakeModel();
    const { el } = mount(model);
    const warning = "compute_metrics raised ConnectionError: <offline> (its metrics are skipped)";
    model.emit({ type: "snapshot", state: snapshot([run(1, { warning }), run(2)]) });
    const shown = row(el, 1).querySelector(".rfnb-warning");
    expect(shown.hidden).toBe(false);
    expect(shown.textContent).toBe(warning); // as text, never as HTML
    expect(row(el, 2).querySelector(".rfnb-warning").hidden).toBe(true);
    model.emit({ type: "snapshot", state: snapshot([run(1, { warning, status: "failed", error: "boom" })]) });
    expect(row(el, 1).querySelector(".rfnb-warning").hidden).toBe(false); // it may be why the run failed
  });

  it("renders run names, errors and op reasons as text, never as HTML", () => {
    const model = fakeModel();
    const { el } = mount(model);
    const evil = "<img src=x onerror=alert(1)>";
    const state = snapshot([run(1, { name: evil, status: "failed", error: `Traceback\nValueError: ${evil}` })]);
    state.experiment = evil;
    state.ops = [{ op_id: 1, time: 0, origin: "panel", op: "stop", run_id: 1, args: {}, outcome: "refused", reason: evil }];
    model.emit({ type: "snapshot", state });
    expect(el.querySelector("img")).toBeNull();
    expect(el.querySelector(".rfnb-title").textContent).toBe(evil);
    expect(row(el, 1).textContent).toContain(evil);
    expect(el.querySelector(".rfnb-log").textContent).toContain(evil);
  });

  it("shows why the experiment paused when its directory cannot be written, as text", () => {
    const model = fakeModel();
    const { el } = mount(model);
    const state = snapshot([run(1, { status: "stopped" })]);
    model.emit({ type: "snapshot", state });
    expect(el.querySelector(".rfnb-alert").hidden).toBe(true);
    state.header = { ...state.header, storage_error: "cannot write run 1's checkpoint: <b>No space left</b>" };
    model.emit({ type: "snapshot", state });
    const alert = el.querySelector(".rfnb-alert");
    expect(alert.hidden).toBe(false);
    expect(alert.textContent).toContain("Paused: cannot write run 1's checkpoint: <b>No space left</b>");
    expect(alert.querySelector("b")).toBeNull();
  });

  it("shows a failing tracker's notice as text, and hides it once cleared", () => {
    const model = fakeModel();
    const { el } = mount(model);
    const state = snapshot([run(1)]);
    model.emit({ type: "snapshot", state });
    expect(el.querySelector(".rfnb-notice").hidden).toBe(true);
    state.header = { ...state.header, notices: ["mlflow tracking failed (training goes on; retrying): <i>refused</i>"] };
    model.emit({ type: "snapshot", state });
    const notice = el.querySelector(".rfnb-notice");
    expect(notice.hidden).toBe(false);
    expect(notice.textContent).toBe("mlflow tracking failed (training goes on; retrying): <i>refused</i>");
    expect(notice.querySelector("i")).toBeNull();
    state.header = { ...state.header, notices: [] };
    model.emit({ type: "snapshot", state });
    expect(el.querySelector(".rfnb-notice").hidden).toBe(true);
  });

  it("gives the plotted metric its own table column", () => {
    const model = fakeModel();
    const { el } = mount(model);
    const state = snapshot([run(1, { latest: { loss: 1.5, reward: 0.25 } })], { 1: { loss: [[1, 1.5]], reward: [[1, 0.25]] } });
    model.emit({ type: "snapshot", state });
    expect([...el.querySelectorAll("th")].map((th) => th.textContent)).not.toContain("reward");
    const select = el.querySelector("select.rfnb-metric");
    select.value = "reward";
    select.dispatchEvent(new Event("change"));
    const titles = [...el.querySelectorAll("th")].map((th) => th.textContent);
    expect(titles).toContain("reward");
    const cells = [...row(el, 1).querySelectorAll("td")].map((td) => td.textContent);
    expect(cells[titles.indexOf("reward")]).toBe("0.25");
  });

  it("highlights a run from its legend entry or its table row", async () => {
    const model = fakeModel();
    const plot = fakePlot();
    const { el, panel } = mount(model, () => plot);
    model.emit({ type: "snapshot", state: snapshot([run(1), run(2)]) });
    await panel.plotReady;
    el.querySelector('.rfnb-chip[data-run="2"]').click();
    expect(plot.updates.at(-1).highlight).toBe(2);
    row(el, 1).querySelector("td").click();
    expect(plot.updates.at(-1).highlight).toBe(1);
  });

  it("takes the live statuses from the kernel's messages", () => {
    const model = fakeModel();
    const { el } = mount(model);
    const state = snapshot([run(1, { status: "queued" }), run(2)]);
    model.emit({ type: "snapshot", state }); // no live_statuses (an older saved snapshot): queued and training
    expect(row(el, 1).querySelector("button.rfnb-stop").disabled).toBe(false);
    model.emit({ type: "snapshot", state: { ...state, live_statuses: ["training"] } });
    expect(row(el, 1).querySelector("button.rfnb-stop").disabled).toBe(true);
    expect(row(el, 2).querySelector("button.rfnb-stop").disabled).toBe(false);
    model.emit({ ...delta(0, 0, [run(1, { status: "queued" })], {}), live_statuses: ["queued"] });
    expect(row(el, 1).querySelector("button.rfnb-stop").disabled).toBe(false);
    expect(el.querySelector(".rfnb-stop-all").disabled).toBe(false);
  });

  it("polls the kernel in pull mode", () => {
    const model = fakeModel({ mode: "pull" });
    const timers = [];
    const el = document.createElement("div");
    new Panel(model, el, { plotFactory: () => fakePlot(), setTimeout: (fn) => timers.push(fn) });
    expect(model.sent.map((m) => m.type)).toEqual(["sync", "pull"]);
    timers.shift()();
    expect(model.sent.at(-1)).toMatchObject({ type: "pull", since: 0 });
  });
});

describe("state", () => {
  it("keeps a long curve bounded, evenly thinned, reaching the newest point", () => {
    const state = fromSnapshot(snapshot([run(1)], {}, 0));
    let cursor = 0;
    for (let i = 0; i < 20; i++) {
      const points = Array.from({ length: 500 }, (_, j) => [cursor + j + 1, 1]);
      expect(applyDelta(state, delta(cursor, cursor + 500, [run(1)], { 1: { loss: points } }))).toBe(true);
      cursor += 500;
    }
    const curve = state.series[1].loss;
    expect(curve.length).toBeLessThanOrEqual(MAX_POINTS);
    expect(curve.length).toBeGreaterThan(MAX_POINTS / 2);
    const gaps = new Set(curve.slice(1).map((p, i) => p[0] - curve[i][0]));
    expect([...gaps]).toEqual([curve.stride]); // evenly spread, old and new alike
    expect(pointsOf(curve).at(-1)[0]).toBe(10000); // the line reaches the newest value
    expect(curveFor(state, run(1), "loss").steps.at(-1)).toBe(10000);
  });

  it("knows the live statuses from the last message, queued and training without one", () => {
    const state = fromSnapshot(snapshot([run(1, { status: "queued" })]));
    expect(isLive(state, state.runs[0])).toBe(true);
    applyDelta(state, { ...delta(0, 0, [run(1, { status: "queued" })], {}), live_statuses: ["training"] });
    expect(isLive(state, state.runs[0])).toBe(false);
    applyDelta(state, delta(0, 0, [run(1, { status: "queued" })], {})); // a delta without them keeps the last
    expect(isLive(state, state.runs[0])).toBe(false);
  });

  it("smooths like TensorBoard and keeps gaps", () => {
    expect(smooth([1, 1, 1], 0.9)).toEqual([1, 1, 1].map(() => expect.closeTo(1, 10)));
    const s = smooth([0, 10, null, 10], 0.5);
    expect(s[2]).toBeNull();
    expect(s[1]).toBeGreaterThan(0);
    expect(s[1]).toBeLessThan(10);
    expect(smooth([3, 4], 0)).toEqual([3, 4]);
  });

  it("formats values briefly", () => {
    expect(formatValue(3e-4)).toBe("3e-4");
    expect(formatValue(0.1)).toBe("0.1");
    expect(formatValue(16)).toBe("16");
    expect(formatValue("cosine")).toBe("cosine");
    expect(formatValue(null)).toBe("");
  });
});
