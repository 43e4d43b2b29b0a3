// game.js: the /game page, "Sing to fly". The microphone goes to the built-in `pitch` model (MIDI
// per 20 ms window) and `speech_activity` (speech_start events): the bird's height follows the
// sung pitch, a sound's start makes it hop, and coins float at note heights to be sung. Every
// result is applied by the first animation frame after it arrives (never later, never earlier),
// and what each frame drew is kept on window.game.timeline.
import { connectShowingState, microphoneTo } from "./connect.js";

const $ = (id) => document.getElementById(id);
const LOW = 48, HIGH = 84; // C3 at the bottom of the sky, C6 at the top
const BIRD_X = 0.45; // of the width
const NAMES = ["C", "C♯", "D", "E♭", "E", "F", "F♯", "G", "A♭", "A", "B♭", "B"];
const noteName = (midi) => `${NAMES[midi % 12]}${Math.floor(midi / 12) - 1}`;
const heightOf = (midi) => Math.max(0, Math.min(1, (midi - LOW) / (HIGH - LOW)));
const SONG = [60, 64, 67, 72, 67, 64, 62, 65, 69, 72, 71, 67]; // the coins' notes, in turn

// What the game did, for people (the canvas) and for tests (window.game).
const game = (window.game = {
  status: "connecting", range: [LOW, HIGH], frames: 0, score: 0, caught: 0, missed: 0, jumps: 0,
  late: 0, note: null, rttMs: null, serverMs: null, sentToDrawnMs: null, timeline: [], speech: [], errors: [],
});
const failed = (what) => game.errors.length < 50 && game.errors.push(String(what));
addEventListener("error", (e) => failed(e.message));
addEventListener("unhandledrejection", (e) => failed(e.reason));

// Results and events wait here for the next frame.
let windows = []; // [t, midi] of pitch windows not drawn yet
let arrived = null; // {at, frame} of the oldest of them
let hopAsked = false;
const ema = (old, value, k = 0.1) => (old === null ? value : (1 - k) * old + k * value);

// The bird: `voice` follows the pitch, `hop` is the jump on top of it (both 0..1 of the sky).
let voice = 0, hop = 0, hopSpeed = 0, lastVoicedT = -Infinity, lastT = 0;
const coins = [];
let nextCoin = 0, songAt = 0, lastFrame = null;

function frame(now) {
  requestAnimationFrame(frame);
  const dt = lastFrame === null ? 0 : Math.min(0.1, (now - lastFrame) / 1000);
  lastFrame = now;
  game.frames++;

  // 1. What arrived since the last frame.
  let drawn = null;
  if (windows.length) {
    let midi = 0;
    for (const [t, m] of windows) {
      if (m > 0) {
        voice = heightOf(m); // at once: the newest pitch is what this frame shows
        lastVoicedT = t;
        game.note = Math.round(m);
      }
      [lastT, midi] = [t, m];
    }
    // t0..t: the stream times (ms) of the first and last pitch window this frame applies
    drawn = { t0: windows[0][0], t: lastT, midi, arrivedFrame: arrived.frame, lagMs: performance.now() - arrived.at };
    windows = [];
    arrived = null;
  }
  if (hopAsked && hop === 0) {
    hopSpeed = 2.0; // sky heights per second: a hop of 0.2 sky for 0.4 s
    game.jumps++;
  }
  hopAsked = false;

  // 2. Move: silence for over 150 ms lets the bird sink; the hop rises and falls.
  if (lastT - lastVoicedT > 150) voice = Math.max(0, voice - 0.4 * dt);
  if (hop > 0 || hopSpeed > 0) {
    hop += hopSpeed * dt;
    hopSpeed -= 10 * dt;
    if (hop <= 0) hop = hopSpeed = 0;
  }
  const y = Math.min(1, voice + hop);
  if (drawn) {
    game.timeline.push({ ...drawn, frame: game.frames, voice, hop, y });
    if (game.timeline.length > 6000) game.timeline.splice(0, 1000);
    game.sentToDrawnMs = ema(game.sentToDrawnMs, (game.rttMs ?? 0) + drawn.lagMs);
  }

  // 3. Coins: one every 1.5 s at the song's next note; caught when the bird is at its height.
  if (now > nextCoin) {
    coins.push({ midi: SONG[songAt++ % SONG.length], x: 1.05 });
    nextCoin = now + 1500;
  }
  for (const c of coins) {
    const before = c.x;
    c.x -= 0.12 * dt;
    if (before >= BIRD_X && c.x < BIRD_X) {
      c.caught = Math.abs(y - heightOf(c.midi)) < 0.035;
      if (c.caught) game.score += 10;
      c.caught ? game.caught++ : game.missed++;
    }
  }
  while (coins.length && coins[0].x < -0.05) coins.shift();

  draw(y);
}

function draw(y) {
  const canvas = $("board");
  const w = canvas.clientWidth, h = canvas.clientHeight;
  const size = [Math.round(w * devicePixelRatio), Math.round(h * devicePixelRatio)];
  if (canvas.width !== size[0] || canvas.height !== size[1]) [canvas.width, canvas.height] = size;
  const g = canvas.getContext("2d");
  g.setTransform(devicePixelRatio, 0, 0, devicePixelRatio, 0, 0);
  const top = 80, bottom = h - 48;
  const py = (height) => bottom - height * (bottom - top);

  const sky = g.createLinearGradient(0, top, 0, bottom);
  sky.addColorStop(0, "#17233a");
  sky.addColorStop(1, "#0f1218");
  g.fillStyle = sky;
  g.fillRect(0, 0, w, h);
  g.font = "12px system-ui, sans-serif";
  for (let m = LOW; m <= HIGH; m++) {
    if (![0, 4, 7].includes(m % 12)) continue; // C, E, G
    g.strokeStyle = m % 12 === 0 ? "#3a4a66" : "#222c3d";
    g.beginPath();
    g.moveTo(0, py(heightOf(m)));
    g.lineTo(w, py(heightOf(m)));
    g.stroke();
    g.fillStyle = "#8a93a6";
    g.fillText(noteName(m), 8, py(heightOf(m)) - 3);
  }
  g.fillStyle = "#1c2a1f";
  g.fillRect(0, bottom + 14, w, h - bottom);

  // the voice's trail: the last 4 s of drawn heights, scrolling left with the coins
  const recent = game.timeline.filter((e) => e.t > lastT - 4000);
  g.strokeStyle = "rgba(76,194,255,0.6)";
  g.lineWidth = 3;
  g.beginPath();
  recent.forEach((e, i) => {
    const x = w * (BIRD_X - (0.12 * (lastT - e.t)) / 1000);
    i ? g.lineTo(x, py(e.y)) : g.moveTo(x, py(e.y));
  });
  g.stroke();
  g.lineWidth = 1;

  for (const c of coins) {
    const cx = w * c.x, cy = py(heightOf(c.midi));
    g.fillStyle = c.caught ? "#6ee7a8" : c.caught === false ? "#5a4a2a" : "#ffd166";
    g.beginPath();
    g.arc(cx, cy, 13, 0, 2 * Math.PI);
    g.fill();
    g.fillStyle = "#0f1218";
    g.font = "600 10px system-ui, sans-serif";
    g.textAlign = "center";
    g.fillText(noteName(c.midi), cx, cy + 4);
    g.textAlign = "start";
  }

  // the bird
  const bx = w * BIRD_X, by = py(y);
  g.save();
  g.translate(bx, by);
  g.rotate(hop > 0 ? -0.35 : 0);
  g.fillStyle = "#ff9a2e";
  g.beginPath();
  g.ellipse(0, 0, 22, 17, 0, 0, 2 * Math.PI);
  g.fill();
  g.fillStyle = "#ffd9a8";
  g.beginPath();
  g.ellipse(-6, hop > 0 ? -12 : 4, 12, 7, -0.5, 0, 2 * Math.PI); // the wing
  g.fill();
  g.fillStyle = "#fff";
  g.beginPath();
  g.arc(9, -5, 6, 0, 2 * Math.PI);
  g.fill();
  g.fillStyle = "#0f1218";
  g.beginPath();
  g.arc(11, -5, 3, 0, 2 * Math.PI);
  g.fill();
  g.fillStyle = "#ffb454";
  g.beginPath();
  g.moveTo(20, -2);
  g.lineTo(31, 2);
  g.lineTo(20, 6);
  g.fill();
  g.restore();

  $("score").textContent = game.score;
  $("note").textContent = game.note && lastT - lastVoicedT < 150 ? noteName(game.note) : "–";
  $("rtt").textContent = game.rttMs === null ? "–" : game.rttMs.toFixed(0);
  $("server").textContent = game.serverMs === null ? "–" : game.serverMs.toFixed(1);
  $("latency").textContent = game.sentToDrawnMs === null ? "–" : game.sentToDrawnMs.toFixed(0);
}
requestAnimationFrame(frame);

// --- the server and the microphone ------------------------------------------------------------

const client = await connectShowingState($("status"), (s) => (game.status = s));
const audio = new AudioContext();
const open = (model) => client.open(model, { dtype: "float32", sampleRate: audio.sampleRate });
const [pitch, speech] = [await open("pitch"), await open("speech_activity")];
pitch.onResult = (r) => {
  const midi = r.outputs.midi.data;
  if (!r.windows.length) return; // a chunk that completed no window
  r.windows.forEach((t, i) => windows.push([t, midi[i]]));
  arrived ??= { at: performance.now(), frame: game.frames };
  if (r.roundTripMs !== undefined) game.rttMs = ema(game.rttMs, r.roundTripMs);
  game.serverMs = ema(game.serverMs, r.timing.queue_ms + r.timing.infer_ms);
};
speech.onEvent = (e) => {
  if (!e.event.startsWith("speech_")) return;
  game.speech.push({ event: e.event, t: e.t, frame: game.frames });
  if (e.event === "speech_start") hopAsked = true;
};
// A chunk the server could not run within its deadline is dropped: a live game skips it.
const late = (e) => (["deadline_exceeded", "dropped"].includes(e.code) ? game.late++ : failed(e.code));
for (const s of [pitch, speech]) s.onError = late;
await microphoneTo([pitch, speech], audio).catch((e) => failed(`microphone: ${e.name ?? e}`));
game.listening = true;
