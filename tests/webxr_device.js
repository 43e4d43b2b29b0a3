// An emulated WebXR device for the /xr page's test, installed before the page's own scripts run
// (DevTools' Page.addScriptToEvaluateOnNewDocument). It offers `inline` and `immersive-vr`
// sessions with a head and two tracked controllers moving on known paths, renders both eyes side
// by side into the page's canvas (the layer's framebuffer is the canvas), and counts what the page
// asked of it on `window.xrDevice`. Immersive sessions need a user gesture, as in browsers.
(() => {
  const device = (window.xrDevice = { sessions: [], frames: { inline: 0, "immersive-vr": 0 } });

  const yaw = (a) => [0, Math.sin(a / 2), 0, Math.cos(a / 2)];
  const rotate = ([x, y, z, w], [vx, vy, vz]) => {
    // v + 2w (q x v) + 2 q x (q x v)
    const [cx, cy, cz] = [y * vz - z * vy, z * vx - x * vz, x * vy - y * vx];
    const [dx, dy, dz] = [y * cz - z * cy, z * cx - x * cz, x * cy - y * cx];
    return [vx + 2 * (w * cx + dx), vy + 2 * (w * cy + dy), vz + 2 * (w * cz + dz)];
  };

  /** An XRRigidTransform: position, orientation, column-major matrix and inverse. */
  class RigidTransform {
    constructor(p, q) {
      this.position = new DOMPointReadOnly(p[0], p[1], p[2], 1);
      this.orientation = new DOMPointReadOnly(q[0], q[1], q[2], q[3]);
      const [x, y, z, w] = q;
      this.matrix = new Float32Array([
        1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y), 0,
        2 * (x * y - w * z), 1 - 2 * (x * x + z * z), 2 * (y * z + w * x), 0,
        2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y), 0,
        p[0], p[1], p[2], 1,
      ]);
      this._p = p;
      this._q = q;
    }
    get inverse() {
      const q = [-this._q[0], -this._q[1], -this._q[2], this._q[3]];
      return new RigidTransform(rotate(q, this._p).map((v) => -v), q);
    }
  }

  const perspective = (aspect) => {
    const f = 1, near = 0.05, far = 100, nf = 1 / (near - far); // 90 degrees vertical
    return new Float32Array([f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) * nf, -1, 0, 0, 2 * far * near * nf, 0]);
  };

  /** Where the device is at `ms`: the head sways, each controller circles on its side. */
  function poses(ms) {
    const a = (2 * Math.PI * ms) / 1500;
    return {
      head: new RigidTransform([0.05 * Math.sin(a / 2), 0.02 * Math.sin(a), 0], yaw(0.2 * Math.sin(a / 3))),
      left: new RigidTransform([-0.2 + 0.12 * Math.cos(a), -0.3 + 0.12 * Math.sin(a), -0.5], yaw(a)),
      right: new RigidTransform([0.2 + 0.12 * Math.cos(a), -0.3 - 0.12 * Math.sin(a), -0.5], yaw(-a)),
    };
  }

  class Space {
    constructor(kind) {
      this.kind = kind; // "viewer", "local", "left", "right"
    }
  }

  class Frame {
    constructor(session, ms) {
      this.session = session;
      this.poses = poses(ms);
    }
    getViewerPose() {
      const canvas = this.session.renderState.baseLayer?.gl.canvas;
      const aspect = canvas ? canvas.width / canvas.height : 1;
      if (this.session.mode === "inline") {
        const none = new RigidTransform([0, 0, 0], [0, 0, 0, 1]);
        return { transform: none, views: [{ eye: "none", projectionMatrix: perspective(aspect), transform: none }], emulatedPosition: false };
      }
      const head = this.poses.head;
      const eye = (side) => {
        const offset = rotate(head._q, [side * 0.032, 0, 0]);
        return new RigidTransform(head._p.map((v, i) => v + offset[i]), head._q);
      };
      return {
        transform: head,
        views: [
          { eye: "left", projectionMatrix: perspective(aspect / 2), transform: eye(-1) },
          { eye: "right", projectionMatrix: perspective(aspect / 2), transform: eye(1) },
        ],
        emulatedPosition: false,
      };
    }
    getPose(space) {
      const transform = this.poses[space.kind];
      return transform ? { transform, emulatedPosition: false } : null;
    }
  }

  class Session extends EventTarget {
    constructor(mode) {
      super();
      this.mode = mode;
      this.environmentBlendMode = "opaque";
      this.renderState = { baseLayer: null, depthNear: 0.1, depthFar: 1000, inlineVerticalFieldOfView: mode === "inline" ? Math.PI / 2 : null };
      this.inputSources =
        mode === "inline"
          ? []
          : ["left", "right"].map((hand) => ({ handedness: hand, targetRayMode: "tracked-pointer", gripSpace: new Space(hand), targetRaySpace: new Space(hand), profiles: ["generic-trigger"] }));
      this.ended = false;
    }
    updateRenderState(changes) {
      Object.assign(this.renderState, changes);
    }
    async requestReferenceSpace(type) {
      if (!["viewer", "local"].includes(type)) throw new DOMException(`${type} is not offered`, "NotSupportedError");
      return new Space(type);
    }
    requestAnimationFrame(callback) {
      return requestAnimationFrame((ms) => {
        if (this.ended) return;
        device.frames[this.mode]++;
        callback(ms, new Frame(this, ms));
      });
    }
    cancelAnimationFrame(id) {
      cancelAnimationFrame(id);
    }
    async end() {
      if (this.ended) return;
      this.ended = true;
      this.dispatchEvent(new Event("end"));
    }
  }

  class WebGLLayer {
    constructor(session, gl) {
      this.gl = gl;
      this.framebuffer = null; // the canvas: both eyes side by side, visible in screenshots
    }
    get framebufferWidth() {
      return this.gl.drawingBufferWidth;
    }
    get framebufferHeight() {
      return this.gl.drawingBufferHeight;
    }
    getViewport(view) {
      const { drawingBufferWidth: w, drawingBufferHeight: h } = this.gl;
      if (view.eye === "none") return { x: 0, y: 0, width: w, height: h };
      return { x: view.eye === "left" ? 0 : Math.floor(w / 2), y: 0, width: Math.floor(w / 2), height: h };
    }
  }

  const xr = new EventTarget();
  xr.isSessionSupported = async (mode) => mode === "inline" || mode === "immersive-vr";
  xr.requestSession = async (mode) => {
    if (mode !== "inline" && !navigator.userActivation.isActive) throw new DOMException(`${mode} needs a user gesture`, "SecurityError");
    if (!["inline", "immersive-vr"].includes(mode)) throw new DOMException(`${mode} is not offered`, "NotSupportedError");
    const session = new Session(mode);
    device.sessions.push(mode);
    return session;
  };
  Object.defineProperty(Navigator.prototype, "xr", { get: () => xr, configurable: true });
  window.XRWebGLLayer = WebGLLayer;
  for (const gl of [WebGLRenderingContext, WebGL2RenderingContext]) gl.prototype.makeXRCompatible = async () => {};
})();
