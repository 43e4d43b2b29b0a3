// connect.js: what the example pages (/xr, /game) share: a client connected to the server the
// page came from, retried until it is up, whose connection state is shown in a page element.
import { RealtimeClient, captureMicrophone } from "./realtime.js";

/**
 * Connect to this page's server (`?token=` is passed on), trying again with back-off until it
 * answers, and keep `badge` (an element) showing the state: connecting, connected, disconnected,
 * resumed. Once connected the client itself reconnects and resumes its session (realtime.js).
 * `onState(state)` hears every change too. Resolves with the connected client.
 */
export async function connectShowingState(badge, onState = () => {}) {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
  const token = new URLSearchParams(location.search).get("token") ?? undefined;
  const show = (state) => {
    badge.textContent = state;
    badge.dataset.state = state.split(" ")[0];
    onState(state);
  };
  show("connecting");
  for (let attempt = 0; ; attempt++) {
    try {
      return await RealtimeClient.connect(url, { token, onStatus: show });
    } catch (e) {
      const wait = Math.min(5000, 500 * 2 ** attempt);
      show(`offline (${e.code ?? "no server"}): retrying in ${(wait / 1000).toFixed(1)} s`);
      await new Promise((r) => setTimeout(r, wait));
    }
  }
}

/**
 * Send the microphone to `streams` (already open, float32 at `audioContext.sampleRate`). Where
 * the browser wants a gesture before it plays audio, the capture starts suspended and resumes on
 * the page's first click or key. Returns the capture (realtime.js `captureMicrophone`).
 */
export async function microphoneTo(streams, audioContext) {
  const all = { send: (data, opts) => streams.forEach((s) => s.send(data, opts)) };
  const capture = await captureMicrophone(all, { audioContext });
  if (audioContext.state === "suspended") {
    const resume = () => audioContext.resume();
    addEventListener("pointerdown", resume, { once: true });
    addEventListener("keydown", resume, { once: true });
  }
  return capture;
}
