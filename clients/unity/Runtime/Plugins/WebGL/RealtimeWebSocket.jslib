// The browser side of Runtime/Unity/WebGLTransport.cs: WebSockets (binaryType arraybuffer)
// identified by small integers, messages handed to C# as (pointer, length) into the heap.
// Needs Unity 2021.2 or later (makeDynCall).
var RealtimeWebSocketLib = {
  $RealtimeWS: {
    sockets: {},
    next: 1,
    callbacks: null,
    // Copy bytes into a fresh heap block, call back, free it: C# copies what it keeps.
    deliver: function (cb, id, bytes) {
      var ptr = _malloc(bytes.length || 1);
      HEAPU8.set(bytes, ptr);
      try {
        {{{ makeDynCall('viii', 'cb') }}}(id, ptr, bytes.length);
      } finally {
        _free(ptr);
      }
    },
  },

  RealtimeWS_Init: function (onOpen, onText, onBinary, onClose, onTimer) {
    RealtimeWS.callbacks = { open: onOpen, text: onText, binary: onBinary, close: onClose, timer: onTimer };
  },

  RealtimeWS_Open: function (urlPtr) {
    var id = RealtimeWS.next++;
    var cb = RealtimeWS.callbacks;
    var ws;
    try {
      ws = new WebSocket(UTF8ToString(urlPtr));
    } catch (e) {
      setTimeout(function () { {{{ makeDynCall('viiiii', 'cb.close') }}}(id, 1006, 0, 0, 0); }, 0);
      return id;
    }
    ws.binaryType = "arraybuffer";
    RealtimeWS.sockets[id] = ws;
    ws.onopen = function () { {{{ makeDynCall('vi', 'cb.open') }}}(id); };
    ws.onmessage = function (ev) {
      if (typeof ev.data === "string") RealtimeWS.deliver(cb.text, id, new TextEncoder().encode(ev.data));
      else RealtimeWS.deliver(cb.binary, id, new Uint8Array(ev.data));
    };
    ws.onclose = function (ev) {
      delete RealtimeWS.sockets[id];
      var reason = new TextEncoder().encode(ev.reason || "");
      var ptr = _malloc(reason.length || 1);
      HEAPU8.set(reason, ptr);
      try {
        {{{ makeDynCall('viiiii', 'cb.close') }}}(id, ev.code, ev.wasClean ? 1 : 0, ptr, reason.length);
      } finally {
        _free(ptr);
      }
    };
    return id;
  },

  RealtimeWS_SendText: function (id, textPtr) {
    var ws = RealtimeWS.sockets[id];
    if (ws && ws.readyState === 1) ws.send(UTF8ToString(textPtr));
  },

  RealtimeWS_SendBinary: function (id, dataPtr, length) {
    var ws = RealtimeWS.sockets[id];
    // slice copies out of the heap (which may grow, or be shared with threads).
    if (ws && ws.readyState === 1) ws.send(HEAPU8.slice(dataPtr, dataPtr + length));
  },

  RealtimeWS_Close: function (id, code, reasonPtr) {
    var ws = RealtimeWS.sockets[id];
    if (ws) ws.close(code, UTF8ToString(reasonPtr));
  },

  // Browsers cannot drop a socket without a close frame, and a close frame would end the
  // session on the server. So the socket is only forgotten: the client resumes on a new one
  // and the server, still holding this one, ends it then (docs/protocol.md#resuming-a-session).
  RealtimeWS_Abort: function (id) {
    var ws = RealtimeWS.sockets[id];
    if (!ws) return;
    delete RealtimeWS.sockets[id];
    ws.onopen = ws.onclose = ws.onmessage = null;
  },

  RealtimeWS_SetTimeout: function (id, ms) {
    var cb = RealtimeWS.callbacks;
    setTimeout(function () { {{{ makeDynCall('vi', 'cb.timer') }}}(id); }, ms);
  },
};

autoAddDeps(RealtimeWebSocketLib, "$RealtimeWS");
mergeInto(LibraryManager.library, RealtimeWebSocketLib);
