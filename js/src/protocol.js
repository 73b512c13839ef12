// Talking to the kernel (the protocol is written down in js/README.md): requests with ids unique to this view,
// replies routed to their callbacks, snapshots and deltas handed to the panel, a `sync` when a delta does not
// continue the state, polling in pull mode, and the synced `snapshot` trait.

export const PULL_INTERVAL_MS = 700;

export class Channel {
  /**
   * `cursor()` is how many metric rows the panel's state covers; `onSnapshot(snapshot)` replaces the state;
   * `onDelta(delta)` applies a delta and returns false when it does not continue the state; `onUpdate(n)` is
   * told how many messages with new state have arrived.
   */
  constructor(model, { cursor, onSnapshot, onDelta, onUpdate = () => {}, later }) {
    this.model = model;
    this.cursor = cursor;
    this.handlers = { onSnapshot, onDelta, onUpdate };
    this.later = later;
    this.viewId = Math.random().toString(36).slice(2, 10);
    this.requests = 0;
    this.pending = new Map(); // request id -> callback(reply)
    this.syncing = false;
    this.disposed = false;
    this.updates = 0;

    // Subscribe at once, before anything async: nothing is missed.
    this.onMessage = (msg) => this.receive(msg);
    model.on("msg:custom", this.onMessage);
    this.onTrait = () => {
      const snap = model.get("snapshot");
      if (snap && Number(snap.cursor) >= this.cursor()) onSnapshot(snap);
    };
    model.on("change:snapshot", this.onTrait);
  }

  /** Ask for the state: a snapshot now, and in pull mode a delta every PULL_INTERVAL_MS. */
  start() {
    this.request({ type: "sync" });
    if (this.model.get("mode") === "pull") this.poll();
  }

  dispose() {
    this.disposed = true;
    this.model.off("msg:custom", this.onMessage);
    this.model.off("change:snapshot", this.onTrait);
  }

  request(message, onReply) {
    const id = `${this.viewId}:${++this.requests}`;
    if (onReply) this.pending.set(id, onReply);
    this.model.send({ ...message, id });
    return id;
  }

  poll() {
    if (this.disposed) return;
    this.request({ type: "pull", since: this.cursor() });
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
    this.handlers.onUpdate(++this.updates);
    if (msg.type === "snapshot") {
      this.syncing = false;
      this.handlers.onSnapshot(msg.state);
    } else if (msg.type === "delta" && !this.handlers.onDelta(msg) && !this.syncing) {
      this.syncing = true; // one sync at a time, however many deltas miss meanwhile
      this.request({ type: "sync" });
    }
  }
}
