// xr.js: the /xr page. Every XR frame sends the viewer's and both controllers' poses to the
// built-in `pose` model (a [3, 7] float32 chunk: rows head, left, right; x y z, then quaternion
// x y z w) and draws the server's prediction beside the tracked pose, with the round trip on
// screen and the microphone's speech start/end as a floating label. Plain WebGL, no framework.
//
// Sessions, best first: immersive-vr or immersive-ar where the browser offers one (a button, as
// browsers want a click), else an inline session, else a plain animation loop; the last two look
// around with the mouse. Hands without a controller (inline, phones) are animated in front of you.
import { connectShowingState, microphoneTo } from "./connect.js";

const $ = (id) => document.getElementById(id);
const TRACKED = [0.3, 0.6, 1.0, 1.0];
const PREDICTED = [1.0, 0.6, 0.18, 1.0];
const FLOOR_Y = -1.6; // the 'local' space has its origin at the head: the floor is below it

// What the page does, for people (the HUD) and for tests (window.xrDemo).
const state = (window.xrDemo = {
  status: "connecting", mode: null, offered: null, controllers: 0,
  frames: 0, framesIn: {}, posesSent: 0, posesSkipped: 0, poseResults: 0, predictedDrawn: 0,
  late: 0, rttMs: null, speech: [], label: "microphone off", errors: [], lastPair: null,
  probe: false, probed: null, resumes: 0,
});
const failed = (what) => state.errors.length < 50 && state.errors.push(String(what));
addEventListener("error", (e) => failed(e.message));
addEventListener("unhandledrejection", (e) => failed(e.reason));

// --- small 3D maths: column-major 4x4 matrices, quaternions [x, y, z, w] ----------------------

function mul(a, b) {
  const o = new Float32Array(16);
  for (let c = 0; c < 4; c++)
    for (let r = 0; r < 4; r++) {
      let s = 0;
      for (let k = 0; k < 4; k++) s += a[k * 4 + r] * b[c * 4 + k];
      o[c * 4 + r] = s;
    }
  return o;
}

/** The matrix placing a thing at position p, rotated by quaternion q, scaled by s. */
function placed(p, q, s = 1) {
  const [x, y, z, w] = q;
  const [xx, yy, zz, xy, xz, yz, wx, wy, wz] = [x * x, y * y, z * z, x * y, x * z, y * z, w * x, w * y, w * z];
  return new Float32Array([
    (1 - 2 * (yy + zz)) * s, 2 * (xy + wz) * s, 2 * (xz - wy) * s, 0,
    2 * (xy - wz) * s, (1 - 2 * (xx + zz)) * s, 2 * (yz + wx) * s, 0,
    2 * (xz + wy) * s, 2 * (yz - wx) * s, (1 - 2 * (xx + yy)) * s, 0,
    p[0], p[1], p[2], 1,
  ]);
}

/** The inverse of a rotation + translation matrix (a camera's view matrix from its pose). */
function invertRigid(m) {
  const o = new Float32Array(16);
  for (let r = 0; r < 3; r++) for (let c = 0; c < 3; c++) o[c * 4 + r] = m[r * 4 + c];
  for (let r = 0; r < 3; r++) o[12 + r] = -(o[r] * m[12] + o[4 + r] * m[13] + o[8 + r] * m[14]);
  o[15] = 1;
  return o;
}

function perspective(fovy, aspect, near, far) {
  const f = 1 / Math.tan(fovy / 2), nf = 1 / (near - far);
  return new Float32Array([f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) * nf, -1, 0, 0, 2 * far * near * nf, 0]);
}

function quatMul([ax, ay, az, aw], [bx, by, bz, bw]) {
  return [aw * bx + ax * bw + ay * bz - az * by, aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw, aw * bw - ax * bx - ay * by - az * bz];
}

const yawPitch = (yaw, pitch) => quatMul([0, Math.sin(yaw / 2), 0, Math.cos(yaw / 2)], [Math.sin(pitch / 2), 0, 0, Math.cos(pitch / 2)]);

/** Point p moved by `distance` along the forward (-z) axis of orientation q. */
function ahead(p, q, distance) {
  const m = placed(p, q);
  return [p[0] - m[8] * distance, p[1] - m[9] * distance, p[2] - m[10] * distance];
}

const poseOf = (t) => ({ p: [t.position.x, t.position.y, t.position.z], q: [t.orientation.x, t.orientation.y, t.orientation.z, t.orientation.w] });

/** A hand with no controller: circling in front of the start position (side -1 left, 1 right). */
function animatedHand(side, ms) {
  const a = (2 * Math.PI * ms) / 2000;
  return { p: [side * 0.22 + 0.1 * Math.cos(a), -0.3 + 0.1 * Math.sin(side * a), -0.55], q: yawPitch(side * a, 0.4) };
}

// --- WebGL: one program, a cube, a floor grid, a label quad ----------------------------------

const canvas = $("scene");
const gl = canvas.getContext("webgl", { xrCompatible: true, antialias: true, alpha: true });
if (!gl) {
  $("mode").textContent = "no WebGL in this browser";
  throw new Error("no WebGL");
}
const program = (() => {
  const vs = `attribute vec3 aPos; attribute vec3 aNormal; attribute vec2 aUv;
    uniform mat4 uMvp; uniform mat4 uModel; varying vec3 vNormal; varying vec2 vUv;
    void main() { gl_Position = uMvp * vec4(aPos, 1.0); vNormal = (uModel * vec4(aNormal, 0.0)).xyz; vUv = aUv; }`;
  const fs = `precision mediump float; uniform vec4 uColor; uniform sampler2D uTex; uniform float uTextured; uniform float uLit;
    varying vec3 vNormal; varying vec2 vUv;
    void main() {
      float light = mix(1.0, 0.6 + 0.4 * max(dot(normalize(vNormal), normalize(vec3(0.3, 0.8, 0.6))), 0.0), uLit);
      vec4 c = uTextured > 0.5 ? texture2D(uTex, vUv) : uColor;
      gl_FragColor = vec4(c.rgb * light, c.a * uColor.a);
    }`;
  const p = gl.createProgram();
  for (const [type, src] of [[gl.VERTEX_SHADER, vs], [gl.FRAGMENT_SHADER, fs]]) {
    const s = gl.createShader(type);
    gl.shaderSource(s, src);
    gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
    gl.attachShader(p, s);
  }
  gl.linkProgram(p);
  if (!gl.getProgramParameter(p, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(p));
  return p;
})();
const loc = Object.fromEntries(["aPos", "aNormal", "aUv"].map((n) => [n, gl.getAttribLocation(program, n)]));
const uni = Object.fromEntries(["uMvp", "uModel", "uColor", "uTex", "uTextured", "uLit"].map((n) => [n, gl.getUniformLocation(program, n)]));

/** A vertex buffer of [x y z nx ny nz u v] rows, drawn as `mode`. */
function mesh(rows, mode = gl.TRIANGLES) {
  const buffer = gl.createBuffer();
  gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
  gl.bufferData(gl.ARRAY_BUFFER, new Float32Array(rows.flat()), gl.STATIC_DRAW);
  return { buffer, count: rows.length, mode };
}

const cube = mesh( // counter-clockwise faces seen from outside: u x v = n
  [[0, 0, 1], [0, 0, -1], [0, 1, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0]].flatMap((n) => {
    const u = n[0] ? [0, 1, 0] : [1, 0, 0];
    const v = [n[1] * u[2] - n[2] * u[1], n[2] * u[0] - n[0] * u[2], n[0] * u[1] - n[1] * u[0]];
    const corner = (a, b) => [0, 1, 2].map((i) => 0.5 * (n[i] + a * u[i] + b * v[i]));
    return [[-1, -1], [1, -1], [1, 1], [-1, -1], [1, 1], [-1, 1]].map(([a, b]) => [...corner(a, b), ...n, 0, 0]);
  }),
);
const steps = Array.from({ length: 21 }, (_, i) => -5 + i * 0.5);
const grid = mesh( // 0.5 m segments: long lines through the viewer's plane clip badly on some GPUs
  steps.flatMap((a) => steps.slice(1).flatMap((b) => [
    [a, 0, b - 0.5, 0, 1, 0, 0, 0], [a, 0, b, 0, 1, 0, 0, 0], [b - 0.5, 0, a, 0, 1, 0, 0, 0], [b, 0, a, 0, 1, 0, 0, 0],
  ])),
  gl.LINES,
);
const quad = mesh([[-0.5, -0.5, 0, 0, 0, 1, 0, 1], [0.5, -0.5, 0, 0, 0, 1, 1, 1], [0.5, 0.5, 0, 0, 0, 1, 1, 0], [-0.5, -0.5, 0, 0, 0, 1, 0, 1], [0.5, 0.5, 0, 0, 0, 1, 1, 0], [-0.5, 0.5, 0, 0, 0, 1, 0, 0]]);
const links = { buffer: gl.createBuffer(), count: 0, mode: gl.LINES }; // tracked -> predicted

// The floating label: a 2D canvas drawn into a texture when its text changes.
const label = { canvas: Object.assign(document.createElement("canvas"), { width: 512, height: 128 }), texture: gl.createTexture(), text: "" };
function updateLabel() {
  const rtt = state.rttMs === null ? "–" : state.rttMs.toFixed(1);
  const text = `${state.label}|round trip ${rtt} ms · ${state.status}`;
  if (text === label.text) return;
  label.text = text;
  const g = label.canvas.getContext("2d");
  g.clearRect(0, 0, 512, 128);
  g.fillStyle = "rgba(15,18,24,0.85)";
  g.beginPath();
  g.roundRect(4, 4, 504, 120, 18);
  g.fill();
  g.fillStyle = state.label.startsWith("speaking") ? "#6ee7a8" : "#e6e9ef";
  g.font = "600 44px system-ui, sans-serif";
  g.fillText(state.label, 24, 58);
  g.fillStyle = "#8a93a6";
  g.font = "28px system-ui, sans-serif";
  g.fillText(text.split("|")[1], 24, 104);
  gl.bindTexture(gl.TEXTURE_2D, label.texture);
  gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA, gl.RGBA, gl.UNSIGNED_BYTE, label.canvas);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
}

function draw(m, viewProj, model, color, { lit = 1, textured = 0 } = {}) {
  gl.bindBuffer(gl.ARRAY_BUFFER, m.buffer);
  for (const [name, size, offset] of [["aPos", 3, 0], ["aNormal", 3, 12], ["aUv", 2, 24]]) {
    gl.enableVertexAttribArray(loc[name]);
    gl.vertexAttribPointer(loc[name], size, gl.FLOAT, false, 32, offset);
  }
  gl.uniformMatrix4fv(uni.uMvp, false, mul(viewProj, model));
  gl.uniformMatrix4fv(uni.uModel, false, model);
  gl.uniform4fv(uni.uColor, color);
  gl.uniform1f(uni.uLit, lit);
  gl.uniform1f(uni.uTextured, textured);
  gl.drawArrays(m.mode, 0, m.count);
}

const IDENTITY = placed([0, 0, 0], [0, 0, 0, 1]);
const LABEL_AT = new Float32Array([0.8, 0, 0, 0, 0, 0.2, 0, 0, 0, 0, 1, 0, 0, 0.3, -1.6, 1]); // 0.8 x 0.2 m

/** One view of the scene: floor, label, tracked poses, then the predicted ones on top. */
function drawView(viewProj, tracked, predicted, opaque) {
  if (opaque) draw(grid, viewProj, placed([0, FLOOR_Y, 0], [0, 0, 0, 1]), [0.3, 0.36, 0.45, 1], { lit: 0 });
  gl.bindTexture(gl.TEXTURE_2D, label.texture);
  draw(quad, viewProj, LABEL_AT, [1, 1, 1, 1], { lit: 0, textured: 1 });
  const gaze = (pose) => placed(ahead(pose.p, pose.q, 1.5), pose.q, 0.03);
  draw(cube, viewProj, gaze(tracked[0]), TRACKED);
  for (const hand of tracked.slice(1)) draw(cube, viewProj, placed(hand.p, hand.q, 0.07), TRACKED);
  if (!predicted) return;
  gl.disable(gl.DEPTH_TEST); // the prediction is drawn over what it may hide
  draw(links, viewProj, IDENTITY, [1, 1, 1, 0.8], { lit: 0 });
  draw(cube, viewProj, gaze(predicted[0]), PREDICTED);
  for (const hand of predicted.slice(1)) draw(cube, viewProj, placed(hand.p, hand.q, 0.05), PREDICTED);
  gl.enable(gl.DEPTH_TEST);
}

// --- the frame: send the poses, draw the latest prediction -----------------------------------

let poseStream = null;
let latest = null; // the last prediction received: drawn by the next frame
const sentAt = new Map(); // seq -> the poses sent, until answered
let frameMs = 1000 / 60;
let lastTime = null;

function rowsOf(poses) {
  const rows = new Float32Array(21);
  poses.forEach(({ p, q }, i) => rows.set([...p, ...q], 7 * i));
  return rows;
}
const posesOf = (rows) => [0, 1, 2].map((i) => ({ p: Array.from(rows.slice(7 * i, 7 * i + 3)), q: Array.from(rows.slice(7 * i + 3, 7 * i + 7)) }));

/** Send this frame's poses, unless too many are unanswered (a lost connection, a slow server). */
function sendPoses(time, poses) {
  if (!poseStream) return;
  if (poseStream.inFlight >= 4) {
    state.posesSkipped++;
    return;
  }
  const rows = rowsOf(poses);
  const seq = poseStream.send(rows, { shape: [3, 7], t: time });
  sentAt.set(seq, rows);
  state.posesSent++;
}

function onPrediction(r) {
  state.poseResults++;
  const predicted = r.outputs.predicted.data;
  latest = posesOf(predicted);
  if (r.roundTripMs !== undefined) state.rttMs = state.rttMs === null ? r.roundTripMs : 0.9 * state.rttMs + 0.1 * r.roundTripMs;
  const sent = sentAt.get(r.seq);
  sentAt.delete(r.seq);
  for (const seq of sentAt.keys()) if (seq < r.seq) sentAt.delete(seq);
  if (sent) state.lastPair = { seq: r.seq, sent: Array.from(sent), predicted: Array.from(predicted) };
}

/**
 * Where a world point lands in a view's viewport, in framebuffer pixels (origin bottom left),
 * and its clip w (> 0: in front of the viewer).
 */
function project(viewProj, viewport, p) {
  const m = viewProj;
  const clip = [0, 1, 2, 3].map((r) => m[r] * p[0] + m[4 + r] * p[1] + m[8 + r] * p[2] + m[12 + r]);
  const [x, y, w] = [clip[0] / clip[3], clip[1] / clip[3], clip[3]];
  return [viewport.x + ((x + 1) / 2) * viewport.width, viewport.y + ((y + 1) / 2) * viewport.height, w];
}

/**
 * One frame of any session: `views` are {proj, view, viewport}; `poses` the tracked head, left
 * and right hand. Sends the poses, then draws them and the latest prediction into `framebuffer`.
 */
function frame(time, poses, framebuffer, views, opaque) {
  state.frames++;
  state.framesIn[state.mode] = (state.framesIn[state.mode] ?? 0) + 1;
  if (lastTime !== null) frameMs = 0.95 * frameMs + 0.05 * Math.min(100, time - lastTime);
  lastTime = time;
  sendPoses(time, poses);
  updateLabel();
  const predicted = latest;
  if (predicted) {
    const segments = [1, 2].flatMap((i) => [...poses[i].p, 0, 1, 0, 0, 0, ...predicted[i].p, 0, 1, 0, 0, 0]);
    gl.bindBuffer(gl.ARRAY_BUFFER, links.buffer);
    gl.bufferData(gl.ARRAY_BUFFER, new Float32Array(segments), gl.DYNAMIC_DRAW);
    links.count = 4;
  }
  gl.bindFramebuffer(gl.FRAMEBUFFER, framebuffer);
  gl.clearColor(0.06, 0.07, 0.1, opaque ? 1 : 0);
  gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
  gl.enable(gl.DEPTH_TEST);
  gl.enable(gl.CULL_FACE); // (so the predicted cubes, drawn over everything, show their front)
  gl.enable(gl.BLEND);
  gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
  gl.useProgram(program);
  for (const v of views) {
    const { x, y, width, height } = v.viewport;
    gl.viewport(x, y, width, height);
    drawView(mul(v.proj, v.view), poses, predicted, opaque);
  }
  if (predicted) state.predictedDrawn++;
  if (predicted && state.probe) {
    // For tests and the curious: read back the pixel at the predicted right hand's centre.
    // Only where it is on screen, a few pixels in: slow frames extrapolate it further, out of
    // view at times, and a centre on a viewport's last column rounds into the next view's first.
    const [px, py, w] = project(mul(views[0].proj, views[0].view), views[0].viewport, predicted[2].p);
    const { x, y, width, height } = views[0].viewport;
    const m = 4;
    if (w > 0 && px >= x + m && px < x + width - m && py >= y + m && py < y + height - m) {
      const rgba = new Uint8Array(4);
      gl.readPixels(Math.floor(px), Math.floor(py), 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, rgba);
      state.probed = { at: [px, py], rgba: Array.from(rgba), predicted: PREDICTED.map((c) => Math.round(255 * c)) };
      state.probe = false;
    }
  }
  $("sent").textContent = state.posesSent;
  $("results").textContent = state.poseResults;
  $("rtt").textContent = state.rttMs === null ? "–" : state.rttMs.toFixed(1);
  $("ahead").textContent = `2 frames, ${(2 * frameMs).toFixed(0)} ms`;
}

// --- sessions: immersive, inline, or none (mouse-look) ----------------------------------------

const look = { yaw: 0, pitch: 0 };
canvas.addEventListener("pointermove", (e) => {
  if (!(e.buttons & 1)) return;
  look.yaw -= e.movementX * 0.005;
  look.pitch = Math.max(-1.4, Math.min(1.4, look.pitch - e.movementY * 0.005));
});
const mouseHead = () => ({ p: [0, 0, 0], q: yawPitch(look.yaw, look.pitch) });

function fitCanvas() {
  const w = Math.round(canvas.clientWidth * devicePixelRatio), h = Math.round(canvas.clientHeight * devicePixelRatio);
  if (canvas.width !== w || canvas.height !== h) Object.assign(canvas, { width: w, height: h });
}

function showMode(mode) {
  state.mode = mode;
  $("mode").textContent = mode;
}

let current = null; // the running XR session, if any

/** Run an XR session's frame loop until it ends (then `onEnd`). */
async function runSession(session, mode, spaceType, onEnd) {
  current = session;
  showMode(mode);
  const layer = new XRWebGLLayer(session, gl);
  session.updateRenderState({ baseLayer: layer });
  const space = await session.requestReferenceSpace(spaceType);
  session.addEventListener("end", () => {
    if (current === session) current = null;
    onEnd();
  });
  const opaque = (session.environmentBlendMode ?? "opaque") === "opaque";
  const onFrame = (time, xrFrame) => {
    if (session !== current) return;
    session.requestAnimationFrame(onFrame);
    const viewer = xrFrame.getViewerPose(space);
    if (!viewer) return;
    const layer = session.renderState.baseLayer;
    let head, views;
    if (mode === "inline") {
      fitCanvas();
      head = mouseHead();
      const view = invertRigid(placed(head.p, head.q));
      views = [{ proj: viewer.views[0].projectionMatrix, view, viewport: layer.getViewport(viewer.views[0]) }];
    } else {
      head = poseOf(viewer.transform);
      views = viewer.views.map((v) => ({ proj: v.projectionMatrix, view: v.transform.inverse.matrix, viewport: layer.getViewport(v) }));
    }
    const hands = { left: animatedHand(-1, time), right: animatedHand(1, time) };
    let controllers = 0;
    for (const source of session.inputSources) {
      const pose = (source.gripSpace ?? source.targetRaySpace) && xrFrame.getPose(source.gripSpace ?? source.targetRaySpace, space);
      if (pose && source.handedness in hands) {
        hands[source.handedness] = poseOf(pose.transform);
        controllers++;
      }
    }
    state.controllers = controllers;
    frame(time, [head, hands.left, hands.right], layer.framebuffer, views, opaque);
  };
  session.requestAnimationFrame(onFrame);
}

/** An inline session where there is WebXR, else a plain animation loop: both look with the mouse. */
async function runInline() {
  if (navigator.xr && (await navigator.xr.isSessionSupported("inline").catch(() => false))) {
    const session = await navigator.xr.requestSession("inline");
    return runSession(session, "inline", "viewer", () => {});
  }
  showMode("mouse-look (no WebXR here)");
  const onFrame = (time) => {
    requestAnimationFrame(onFrame);
    fitCanvas();
    const head = mouseHead();
    const views = [{ proj: perspective(1.2, canvas.width / canvas.height, 0.05, 50), view: invertRigid(placed(head.p, head.q)), viewport: { x: 0, y: 0, width: canvas.width, height: canvas.height } }];
    frame(time, [head, animatedHand(-1, time), animatedHand(1, time)], null, views, true);
  };
  requestAnimationFrame(onFrame);
}

async function enterImmersive(mode) {
  await gl.makeXRCompatible();
  const session = await navigator.xr.requestSession(mode);
  const inline = current;
  $("enter").hidden = true;
  await runSession(session, mode, "local", () => {
    $("enter").hidden = false;
    runInline().catch(failed);
  });
  inline?.end().catch(() => {});
}

async function offered(mode) {
  return Boolean(navigator.xr) && (await navigator.xr.isSessionSupported(mode).catch(() => false));
}

// --- start: the scene at once, the server when it answers -------------------------------------

const immersive = (await offered("immersive-vr")) ? "immersive-vr" : (await offered("immersive-ar")) ? "immersive-ar" : null;
state.offered = immersive;
if (immersive) {
  const button = $("enter");
  button.textContent = immersive === "immersive-vr" ? "Enter VR" : "Enter AR";
  button.hidden = false;
  button.onclick = () => enterImmersive(immersive).catch(failed);
}
await runInline();

const client = await connectShowingState($("status"), (s) => {
  state.status = s;
  state.resumes = s === "resumed" ? state.resumes + 1 : state.resumes;
});
const poses = await client.open("pose");
poses.onResult = onPrediction;
// A pose the server could not run within its deadline is dropped: the next frame's will do.
poses.onError = (e) => (["deadline_exceeded", "dropped"].includes(e.code) ? state.late++ : failed(e.code));
poseStream = poses;

const audio = new AudioContext();
const speech = await client.open("speech_activity", { dtype: "float32", sampleRate: audio.sampleRate });
speech.onEvent = (e) => {
  if (!e.event.startsWith("speech_")) return;
  state.speech.push({ event: e.event, t: e.t });
  state.label = e.event === "speech_start" ? "speaking…" : `quiet (spoke ${(e.duration_ms / 1000).toFixed(1)} s)`;
  $("speech").textContent = state.label;
};
speech.onError = (e) => (["deadline_exceeded", "dropped"].includes(e.code) ? state.late++ : failed(e.code));
await microphoneTo([speech], audio).then(
  () => {
    state.label = audio.state === "suspended" ? "tap to start the microphone" : "listening";
    $("speech").textContent = state.label;
    audio.addEventListener("statechange", () => audio.state === "running" && state.label.startsWith("tap") && (state.label = "listening"));
  },
  (e) => {
    state.label = "no microphone";
    $("speech").textContent = `${state.label} (${e.name ?? e})`;
  },
);
