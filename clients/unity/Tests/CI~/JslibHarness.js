// tests/test_unity.py runs Runtime/Plugins/WebGL/RealtimeWebSocket.jslib in Node (its
// WebSocket) as a Unity WebGL build would, and drives it as WebGLTransport.cs does, against a
// real server. The test puts the .jslib (makeDynCall expanded) in place of the marker below.

// Emscripten's runtime as a WebGL build gives it to a .jslib: a heap, malloc, strings.
const HEAPU8 = new Uint8Array(1 << 20);
let top = 8;
const _malloc = (n) => { const p = top; top += (n + 8) & ~7; return p; };
const _free = () => {};
const UTF8ToString = (p) => {
  let e = p;
  while (HEAPU8[e]) e++;
  return new TextDecoder().decode(HEAPU8.subarray(p, e));
};
const put = (bytes) => {
  const p = _malloc(bytes.length + 1);
  HEAPU8.set(bytes, p);
  HEAPU8[p + bytes.length] = 0;
  return p;
};
const str = (s) => put(new TextEncoder().encode(s));
const LibraryManager = { library: {} };
function mergeInto(target, lib) { Object.assign(target, lib); }
function autoAddDeps() {}

// %JSLIB%

const L = LibraryManager.library;
globalThis.RealtimeWS = L.$RealtimeWS;
// What WebGLTransport.cs does: hello, open a pose stream with binary results, send one chunk
// (the header as RealtimeStream writes it), read the result frames, wait on a timer, close.
const seen = [], frames = [];
let id;
const chunk = () => {
  const buf = new ArrayBuffer(32 + 8 + 84), v = new DataView(buf);
  v.setUint8(0, 1); v.setUint8(1, 1); v.setUint8(2, 1); v.setUint8(3, 2);
  v.setUint32(4, 1, true); v.setUint32(8, 0, true); v.setFloat64(16, 0, true);
  v.setUint32(32, 3, true); v.setUint32(36, 7, true);
  const f = new Float32Array(buf, 40, 21);
  for (let d = 0; d < 3; d++) { f[d * 7] = d; f[d * 7 + 6] = 1; }
  return new Uint8Array(buf);
};
const send = (i, msg) => L.RealtimeWS_SendText(i, str(JSON.stringify(msg)));
L.RealtimeWS_Init(
  (i) => {
    seen.push("open");
    send(i, { type: "hello", protocol: 1, client: "jslib" });
  },
  (i, p, n) => {
    const m = JSON.parse(new TextDecoder().decode(HEAPU8.slice(p, p + n)));
    seen.push(m.type);
    if (m.type === "welcome") {
      send(i, { type: "open", stream: 1, model: "pose", kind: "tensor", dtype: "float32", results: "binary", options: {} });
    }
    if (m.type === "opened") {
      const c = chunk();
      L.RealtimeWS_SendBinary(i, put(c), c.length);
    }
  },
  (i, p, n) => {
    const b = HEAPU8.slice(p, p + n), v = new DataView(b.buffer);
    const first = Array.from(new Float32Array(b.buffer, 40, 7));
    frames.push({ type: b[1], seq: v.getUint32(8, true), index: b[14], count: b[15], first });
    if (frames.length === b[15]) L.RealtimeWS_SetTimeout(7, 5);
  },
  (i, code, clean, p, n) => {
    seen.push("close " + code + " " + UTF8ToString(p).slice(0, n));
    console.log(JSON.stringify({ seen, frames }));
    process.exit(0);
  },
  (timer) => {
    seen.push("timer " + timer);
    L.RealtimeWS_Close(id, 1000, str("done"));
  },
);
id = L.RealtimeWS_Open(str(process.argv[2]));
setTimeout(() => {
  console.log(JSON.stringify({ seen, frames, timeout: true }));
  process.exit(1);
}, 30000);
