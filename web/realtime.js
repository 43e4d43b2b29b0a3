// realtime.js: the browser (and Node) client of the `realtime` wire protocol, docs/protocol.md.
// A dependency-free ES module: import it as is, no build step.
//
//   import { RealtimeClient } from "/web/realtime.js";
//   const client = await RealtimeClient.connect("ws://127.0.0.1:8765/", { token });
//   const stream = await client.open("speech_activity", { dtype: "float32", sampleRate: 48000 });
//   stream.onResult = (r) => ...; stream.onEvent = (e) => ...;   // or: for await (const m of stream)
//   stream.send(float32Array, { t: performance.now() });

export const PROTOCOL_VERSION = 1;
export const HEADER_SIZE = 32;
export const FRAME_CHUNK = 1;
export const FRAME_RESULT = 2;
export const FLAG_END_OF_SEGMENT = 1;

/** Wire dtype codes (docs/protocol.md#dtypes), by name, with their typed array. */
export const DTYPES = {
  float32: { code: 1, array: Float32Array },
  float64: { code: 3, array: Float64Array },
  int8: { code: 4, array: Int8Array },
  uint8: { code: 5, array: Uint8Array },
  int16: { code: 6, array: Int16Array },
  uint16: { code: 7, array: Uint16Array },
  int32: { code: 8, array: Int32Array },
  int64: { code: 9, array: BigInt64Array },
};
const BY_CODE = Object.fromEntries(Object.entries(DTYPES).map(([name, d]) => [d.code, { name, ...d }]));

/** The dtype name of a typed array. @param {ArrayBufferView} data @returns {string} */
export function dtypeOf(data) {
  for (const [name, d] of Object.entries(DTYPES)) if (data instanceof d.array) return name;
  throw new TypeError(`no wire dtype for ${data?.constructor?.name}`);
}

/**
 * Encode one chunk as the bytes of a binary WebSocket message.
 * @param {{stream: number, seq: number, t: number, data: ArrayBufferView, shape?: number[],
 *          deadlineMs?: number, flags?: number}} chunk
 * @returns {ArrayBuffer}
 */
export function encodeChunk({ stream, seq, t, data, shape, deadlineMs = 0, flags = 0 }) {
  const dtype = DTYPES[dtypeOf(data)];
  const dims = shape ?? [data.length];
  if (dims.length > 8) throw new RangeError(`${dims.length} dims, at most 8`);
  const count = dims.reduce((a, b) => a * b, 1);
  if (count !== data.length) throw new RangeError(`shape [${dims}] holds ${count} items, data has ${data.length}`);
  const dimsBytes = (4 * dims.length + 7) & ~7;
  const out = new ArrayBuffer(HEADER_SIZE + dimsBytes + data.byteLength);
  const view = new DataView(out);
  view.setUint8(0, PROTOCOL_VERSION);
  view.setUint8(1, FRAME_CHUNK);
  view.setUint8(2, dtype.code);
  view.setUint8(3, dims.length);
  view.setUint32(4, stream, true);
  view.setUint32(8, seq, true);
  view.setUint16(12, flags, true);
  view.setFloat64(16, t, true);
  view.setUint32(24, deadlineMs, true);
  dims.forEach((d, i) => view.setUint32(HEADER_SIZE + 4 * i, d, true));
  new Uint8Array(out, HEADER_SIZE + dimsBytes).set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  return out;
}

/**
 * Decode one binary message (a result frame from the server, or a chunk).
 * @param {ArrayBuffer} buf
 */
export function decodeFrame(buf) {
  const view = new DataView(buf);
  if (buf.byteLength < HEADER_SIZE) throw new RangeError("frame shorter than its header");
  const ndim = view.getUint8(3);
  const dtype = BY_CODE[view.getUint8(2)];
  if (!dtype) throw new RangeError(`unknown dtype code ${view.getUint8(2)}`);
  const shape = Array.from({ length: ndim }, (_, i) => view.getUint32(HEADER_SIZE + 4 * i, true));
  const offset = HEADER_SIZE + ((4 * ndim + 7) & ~7);
  const n = shape.reduce((a, b) => a * b, 1);
  return {
    type: view.getUint8(1) === FRAME_RESULT ? "result" : "chunk",
    stream: view.getUint32(4, true),
    seq: view.getUint32(8, true),
    flags: view.getUint16(12, true),
    index: view.getUint8(14),
    count: view.getUint8(15),
    t: view.getFloat64(16, true),
    extra0: view.getUint32(24, true),
    extra1: view.getUint32(28, true),
    dtype: dtype.name,
    shape,
    data: new dtype.array(buf.slice(offset, offset + n * dtype.array.BYTES_PER_ELEMENT)),
  };
}

/** A typed error from the server (docs/protocol.md#error-codes). */
export class RealtimeError extends Error {
  constructor(msg) {
    super(`${msg.code}: ${msg.message}`);
    this.code = msg.code;
    this.stream = msg.stream;
    this.seq = msg.seq;
    this.retryable = msg.retryable;
    this.reason = msg.reason; // overloaded: "inflight" or "queue"
    this.retryAfterMs = msg.retry_after_ms; // server_busy: how long to wait before trying again
  }
}

/** One open stream: send chunks, get results and events (callbacks or `for await`). */
export class RealtimeStream {
  constructor(client, opened, opts) {
    this.client = client;
    this.id = opened.stream;
    this.opened = opened;
    this.opts = opts;
    this.seq = 0;
    this.inFlight = 0;
    /** @type {(result: object) => void} */ this.onResult = null;
    /** @type {(event: object) => void} */ this.onEvent = null;
    /** @type {(error: RealtimeError) => void} */ this.onError = null;
    this._queue = [];
    this._waiters = [];
    /** Chunks sent and not answered yet, by seq: sent again after a resume if the server lacks them. */
    this._unanswered = new Map();
  }

  /**
   * Send one chunk; returns its seq. `t` is your clock in ms (default performance.now()).
   * While the client resumes a lost connection the chunk is kept and sent after the resume.
   */
  send(data, { t, shape, endOfSegment = false, deadlineMs = 0 } = {}) {
    const seq = this.seq++;
    const time = t ?? (globalThis.performance ? performance.now() : Date.now());
    const frame = encodeChunk({ stream: this.id, seq, t: time, data, shape, deadlineMs, flags: endOfSegment ? FLAG_END_OF_SEGMENT : 0 });
    this._unanswered.set(seq, frame);
    this.client._sendBinary(frame);
    this.inFlight++;
    this.client.sentAt.set(`${this.id}:${seq}`, globalThis.performance ? performance.now() : Date.now());
    return seq;
  }

  close() {
    return this.client._request({ type: "close", stream: this.id }, `closed:${this.id}`);
  }

  _deliver(msg) {
    const last = msg.type === "result" || (msg.type === "error" && msg.seq !== undefined) || (msg.type === "result_frame" && msg.index === msg.count - 1);
    if (last) {
      this.inFlight = Math.max(0, this.inFlight - 1);
      this._unanswered.delete(msg.seq);
    }
    const handler = msg.type === "result" ? this.onResult : msg.type === "event" ? this.onEvent : this.onError;
    if (handler) return handler(msg.type === "error" ? new RealtimeError(msg) : msg);
    const waiter = this._waiters.shift();
    if (waiter) waiter(msg);
    else this._queue.push(msg);
  }

  /** Results, events and errors in order, for those who prefer `for await`. */
  async *[Symbol.asyncIterator]() {
    for (;;) {
      const msg = this._queue.length ? this._queue.shift() : await new Promise((r) => this._waiters.push(r));
      if (msg.type === "closed") return;
      yield msg;
    }
  }
}

/** A connection to a `realtime` server, with reconnect and latency estimates. */
export class RealtimeClient {
  constructor(url, opts = {}) {
    this.url = url;
    this.opts = opts;
    this.streams = new Map();
    this.models = [];
    this.sentAt = new Map();
    /** Round trip (ms) and server-minus-client clock offset (ms), from the last ping. */
    this.rttMs = null;
    this.clockOffsetMs = null;
    this._pending = new Map();
    this._nextStream = 1;
    this._nextPing = 1;
    /** Requests sent and not answered, by the key of their answer (sent again on a resume). */
    this._requests = new Map();
    /** The token that resumes this session (from the welcome, or a going_away that hands it off). */
    this.resumeToken = null;
    /** Times this client resumed its session after a lost connection. */
    this.resumes = 0;
    this._received = 0; // messages received after the session's first welcome
    this._online = false; // connected and welcomed: frames may be sent
    this._handedOff = false; // the server said it hands the session to its next process
    this._busyUntil = 0; // Date.now() before which a server that said server_busy is not dialled
    this.onStatus = opts.onStatus ?? (() => {});
    this.onClose = opts.onClose ?? (() => {});
  }

  /** Connect, say hello, and resolve with the client once the welcome arrived. */
  static async connect(url, opts = {}) {
    const client = new RealtimeClient(url, opts);
    await client._connect();
    await client._hello(false);
    return client;
  }

  async _connect(resume = false) {
    const WS = this.opts.WebSocket ?? globalThis.WebSocket;
    // A resume says so in its URL: a full server refusing a crowd at the door lets it in.
    const query = [this.opts.token && `token=${encodeURIComponent(this.opts.token)}`, resume && "resume=1"].filter(Boolean);
    const url = query.length ? `${this.url}${this.url.includes("?") ? "&" : "?"}${query.join("&")}` : this.url;
    const ws = new WS(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error(`cannot connect to ${this.url}`));
    });
    ws.onmessage = (ev) => this._onMessage(ev.data);
    ws.onclose = (ev) => this._onClose(ev);
  }

  /** Say hello on the new connection (resuming the session or starting one); the welcome. */
  async _hello(resume) {
    const hello = { type: "hello", protocol: PROTOCOL_VERSION, client: "realtime.js" };
    if (resume) Object.assign(hello, { resume: this.resumeToken, received: this._received });
    const welcome = await new Promise((resolve, reject) => {
      this._pending.set("welcome", { resolve, reject });
      this.ws.send(JSON.stringify(hello));
    });
    this.welcome = welcome;
    this.models = welcome.models;
    this.resumeToken = welcome.resume_token ?? null;
    this.onStatus(resume ? "resumed" : "connected");
    return welcome;
  }

  /**
   * A resumed session's welcome (called as it arrives, before any replayed message): count as
   * the server does, then send again the requests and chunks the server did not get.
   */
  _resumed(welcome) {
    this._received = welcome.resumed.from;
    const held = new Map(welcome.resumed.streams.map((s) => [s.stream, s]));
    for (const [key, msg] of this._requests) {
      const [kind, id] = key.split(":");
      const s = held.get(Number(id));
      // Answers the server produced are in the replay; requests it never got go again.
      if (kind === "pong" || (kind === "opened" && !s) || (kind === "closed" && s && !s.closing)) this.ws.send(JSON.stringify(msg));
    }
    for (const stream of this.streams.values()) {
      const s = held.get(stream.id);
      if (!s) continue;
      for (const [seq, frame] of [...stream._unanswered].sort((a, b) => a[0] - b[0])) if (seq > s.received) this.ws.send(frame);
    }
    this._handedOff = false;
    this._online = true;
    this.resumes++;
  }

  /** The catalog entry of a model (its default version unless `version` is given). */
  model(name, version) {
    return this.models.find((m) => m.name === name && (version ? m.version === version : m.default));
  }

  /**
   * Open a stream. Options: dtype, sampleRate (audio), shape, deadlineMs, overflow, options.
   * @returns {Promise<RealtimeStream>}
   */
  async open(model, opts = {}) {
    const entry = this.model(model, opts.version);
    if (!entry) throw new RealtimeError({ code: "unknown_model", message: `no model ${model}` });
    const id = opts.streamId ?? this._nextStream++;
    const msg = {
      type: "open",
      stream: id,
      model,
      kind: entry.kind,
      dtype: opts.dtype ?? entry.input.dtype,
      ...(opts.version ? { version: opts.version } : {}),
      ...(opts.sampleRate ? { sample_rate: Math.round(opts.sampleRate) } : {}),
      ...(opts.shape ? { shape: opts.shape } : {}),
      ...(opts.deadlineMs ? { deadline_ms: opts.deadlineMs } : {}),
      ...(opts.overflow ? { overflow: opts.overflow } : {}),
      options: opts.options ?? {},
    };
    const stream = new RealtimeStream(this, { stream: id }, opts);
    stream._openMsg = msg;
    this.streams.set(id, stream);
    try {
      stream.opened = await this._request(msg, `opened:${id}`);
    } catch (e) {
      this.streams.delete(id);
      throw e;
    }
    return stream;
  }

  /** Measure round trip and clock offset (docs/protocol.md#ping). */
  async ping() {
    const id = this._nextPing++;
    const t0 = globalThis.performance ? performance.timeOrigin + performance.now() : Date.now();
    const pong = await this._request({ type: "ping", id, t: t0 }, `pong:${id}`);
    const t1 = globalThis.performance ? performance.timeOrigin + performance.now() : Date.now();
    this.rttMs = t1 - t0;
    this.clockOffsetMs = pong.server_time - (t0 + t1) / 2;
    return { rttMs: this.rttMs, clockOffsetMs: this.clockOffsetMs };
  }

  close() {
    this._closing = true;
    this.ws?.close(1000);
  }

  _sendBinary(buf) {
    if (this._online) this.ws.send(buf); // else kept by its stream, sent after the resume
  }

  _request(msg, key, now = false) {
    return new Promise((resolve, reject) => {
      const settle = (f) => (v) => {
        this._requests.delete(key);
        f(v);
      };
      this._pending.set(key, { resolve: settle(resolve), reject: settle(reject) });
      this._requests.set(key, msg);
      if (this._online || now) this.ws.send(JSON.stringify(msg));
    });
  }

  _onMessage(data) {
    if (typeof data !== "string") {
      this._received++;
      const f = decodeFrame(data);
      this.streams.get(f.stream)?._deliver({ type: "result_frame", ...f });
      return;
    }
    const msg = JSON.parse(data);
    if (msg.type === "welcome") {
      if (msg.resumed) this._resumed(msg);
      else if (!this._reconnecting) this._online = true; // (a new session: once reopened)
    } else this._received++;
    if (msg.type === "error" && msg.code === "server_busy" && msg.stream === undefined && !this._pending.has("welcome")) {
      // The server fell behind and takes this session back (the close, 1013, follows): tell
      // each stream, typed, and dial again no sooner than it said.
      this._busyUntil = Date.now() + (msg.retry_after_ms ?? 0);
      for (const stream of this.streams.values()) stream._deliver({ ...msg, stream: stream.id });
      return;
    }
    if (msg.type === "going_away" && msg.resume_token) {
      // The session moves to the server's next process: hold chunks until it resumes there.
      this.resumeToken = msg.resume_token;
      this._handedOff = true;
      this._online = false;
    }
    const key = msg.type === "welcome" ? "welcome" : msg.type === "opened" || msg.type === "closed" ? `${msg.type}:${msg.stream}` : msg.type === "pong" ? `pong:${msg.id}` : null;
    if (msg.type === "error" && msg.seq === undefined) {
      // an error about a request (open, hello): fail the request that is waiting for it
      const waitingKey = msg.stream !== undefined ? `opened:${msg.stream}` : "welcome";
      const waiting = this._pending.get(waitingKey);
      if (waiting) {
        this._pending.delete(waitingKey);
        waiting.reject(new RealtimeError(msg));
        return;
      }
    }
    if (key && this._pending.has(key)) {
      const { resolve } = this._pending.get(key);
      this._pending.delete(key);
      resolve(msg);
      if (msg.type !== "closed") return;
    }
    if (msg.stream !== undefined) {
      if (msg.type === "result") {
        const sent = this.sentAt.get(`${msg.stream}:${msg.seq}`);
        if (sent !== undefined) {
          msg.roundTripMs = (globalThis.performance ? performance.now() : Date.now()) - sent;
          this.sentAt.delete(`${msg.stream}:${msg.seq}`);
        }
      }
      this.streams.get(msg.stream)?._deliver(msg);
    }
  }

  _failPending(why) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    this._requests.clear();
    for (const { reject } of pending) reject(new Error(why));
  }

  _onClose(ev) {
    this._online = false;
    if (this._reconnecting) {
      // A connection of the reconnect loop died: fail what waits on it, the loop goes on.
      if (this._resumeMode) this._failOne("welcome", ev.code);
      else this._failPending(`connection closed (${ev.code})`);
      return;
    }
    this.onStatus("disconnected");
    this.onClose(ev);
    const resume = Boolean(this.resumeToken) && (ev.code === 1006 || (ev.code === 1001 && this._handedOff));
    if (!resume || this._closing || this.opts.reconnect === false) this._failPending(`connection closed (${ev.code})`);
    if (!this._closing && this.opts.reconnect !== false) this._reconnect(resume);
  }

  _failOne(key, code) {
    const waiting = this._pending.get(key);
    if (waiting) {
      this._pending.delete(key);
      waiting.reject(new Error(`connection closed (${code})`));
    }
  }

  /**
   * Reconnect with jittered exponential back-off. A lost connection (or a session handed to the
   * server's next process) is resumed for as long as the server keeps it: streams, their state
   * and every answer come back, and unanswered chunks are sent again. Otherwise, or if the resume
   * is refused, a new session starts and the streams are reopened with the same ids and options,
   * their seq restarting at 0.
   */
  async _reconnect(resume) {
    this._reconnecting = true;
    this._resumeMode = resume;
    const until = Date.now() + 1000 * (this.welcome?.limits?.resume_seconds ?? 30);
    const giveUp = (code) => {
      this._resumeMode = resume = false;
      this.resumeToken = null;
      this._failPending(`the session could not be resumed (${code})`);
      // Chunks of the lost session will get no answer: say so, typed, once per stream.
      for (const stream of this.streams.values()) {
        if (!stream._unanswered.size) continue;
        const message = `${stream._unanswered.size} chunks got no answer: the session could not be resumed`;
        stream._unanswered.clear();
        stream._deliver({ type: "error", code, message, stream: stream.id, retryable: false });
      }
    };
    for (let attempt = 0; !this._closing; attempt++) {
      const base = resume ? Math.min(2000, 50 * 2 ** attempt) : Math.min(15000, 500 * 2 ** attempt);
      const told = this._busyUntil - Date.now(); // a server_busy's retry_after_ms, if longer
      await new Promise((r) => setTimeout(r, Math.max(base * (0.5 + Math.random() / 2), told)));
      if (resume && Date.now() > until) giveUp("resume_expired");
      try {
        await this._connect(resume);
        if (resume) {
          try {
            await this._hello(true);
            break;
          } catch (e) {
            if (!(e instanceof RealtimeError)) throw e; // the connection died: try again
            giveUp(e.code); // refused: a new session, on this same connection
          }
        }
        try {
          await this._hello(false);
        } catch (e) {
          if (e instanceof RealtimeError && e.code === "server_busy") this._busyUntil = Date.now() + (e.retryAfterMs ?? 0);
          throw e;
        }
        for (const stream of this.streams.values()) {
          stream.opened = await this._request(stream._openMsg, `opened:${stream.id}`, true);
          // Chunks kept while it reconnected go to the new session, numbered from 0 again.
          const kept = [...stream._unanswered].sort((a, b) => a[0] - b[0]).map(([, frame]) => frame);
          stream._unanswered.clear();
          stream.seq = 0;
          stream.inFlight = kept.length;
          for (const frame of kept) {
            const seq = stream.seq++;
            new DataView(frame).setUint32(8, seq, true); // the header's seq
            stream._unanswered.set(seq, frame);
            this.ws.send(frame);
          }
        }
        for (const msg of this._requests.values()) this.ws.send(JSON.stringify(msg)); // asked meanwhile
        this._online = true;
        break;
      } catch {
        if (this.ws && this.ws.readyState === 1) this.ws.close(1000); // a half-made session
      }
    }
    this._reconnecting = false;
  }
}

/**
 * Capture the microphone through an AudioWorklet and send `chunkMs` chunks of float32 samples at
 * the context's own rate (the server resamples). Returns a function that stops it.
 */
export async function captureMicrophone(stream, { chunkMs = 20, audioContext, mediaStream, workletUrl } = {}) {
  const ctx = audioContext ?? new AudioContext();
  // The worklet before the microphone: no sound is lost while it loads (t 0 is the first sample).
  await ctx.audioWorklet.addModule(workletUrl ?? new URL("./pcm-worklet.js", import.meta.url));
  const media = mediaStream ?? (await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false } }));
  const source = ctx.createMediaStreamSource(media);
  const node = new AudioWorkletNode(ctx, "pcm-chunker", { processorOptions: { chunk: Math.round((ctx.sampleRate * chunkMs) / 1000) } });
  const started = performance.now();
  let sent = 0;
  node.port.onmessage = (ev) => {
    // t: where this chunk starts in the stream's own timeline (ms from the first sample)
    stream.send(ev.data, { t: (1000 * sent) / ctx.sampleRate });
    sent += ev.data.length;
  };
  source.connect(node);
  return {
    sampleRate: ctx.sampleRate,
    started,
    stop() {
      source.disconnect();
      node.disconnect();
      media.getTracks().forEach((tr) => tr.stop());
    },
  };
}

/**
 * Send camera frames, downscaled to the model's [height, width, 3] uint8 input, at `fps`, skipping
 * a frame whenever the previous one has no result yet (a live client must not build a queue).
 */
export async function captureCamera(stream, { width, height, fps = 15, mediaStream, video } = {}) {
  const media = mediaStream ?? (await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 } }));
  const el = video ?? document.createElement("video");
  el.srcObject = media;
  el.muted = true;
  await el.play();
  const canvas = typeof OffscreenCanvas !== "undefined" ? new OffscreenCanvas(width, height) : Object.assign(document.createElement("canvas"), { width, height });
  const g = canvas.getContext("2d", { willReadFrequently: true });
  const rgb = new Uint8Array(width * height * 3);
  let skipped = 0;
  const timer = setInterval(() => {
    if (stream.inFlight > 0) {
      skipped++;
      return;
    }
    g.drawImage(el, 0, 0, width, height);
    const rgba = g.getImageData(0, 0, width, height).data;
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
      rgb[j] = rgba[i];
      rgb[j + 1] = rgba[i + 1];
      rgb[j + 2] = rgba[i + 2];
    }
    stream.send(rgb, { shape: [height, width, 3] });
  }, 1000 / fps);
  return {
    get skipped() {
      return skipped;
    },
    stop() {
      clearInterval(timer);
      media.getTracks().forEach((tr) => tr.stop());
    },
  };
}
