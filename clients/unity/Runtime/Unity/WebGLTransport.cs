// WebGL builds have no ClientWebSocket (no sockets, no threads): this transport drives the
// browser's WebSocket through Plugins/WebGL/RealtimeWebSocket.jslib, so RealtimeClient's API is
// the same there. Calls and callbacks all happen on the browser's (Unity's main) thread.
#if UNITY_WEBGL && !UNITY_EDITOR
using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading.Tasks;
using AOT;

namespace Realtime.Unity
{
    /// <summary>Transports over the browser's WebSocket, and back-off timers over setTimeout
    /// (Task.Delay needs threads WebGL does not have).</summary>
    public sealed class WebGLTransportFactory : ITransportFactory
    {
        public IRealtimeTransport Create() { return new WebGLTransport(); }
        public Task Delay(int milliseconds) { return WebGLTransport.Delay(milliseconds); }
    }

    /// <summary>One browser WebSocket (binaryType arraybuffer), identified by an id on both sides.</summary>
    public sealed class WebGLTransport : IRealtimeTransport
    {
        delegate void OpenCallback(int id);
        delegate void DataCallback(int id, IntPtr data, int length);
        delegate void CloseCallback(int id, int code, int clean, IntPtr reason, int reasonLength);
        delegate void TimerCallback(int id);

        [DllImport("__Internal")] static extern void RealtimeWS_Init(OpenCallback onOpen, DataCallback onText, DataCallback onBinary, CloseCallback onClose, TimerCallback onTimer);
        [DllImport("__Internal")] static extern int RealtimeWS_Open(string url);
        [DllImport("__Internal")] static extern void RealtimeWS_SendText(int id, string text);
        [DllImport("__Internal")] static extern void RealtimeWS_SendBinary(int id, byte[] data, int length);
        [DllImport("__Internal")] static extern void RealtimeWS_Close(int id, int code, string reason);
        [DllImport("__Internal")] static extern void RealtimeWS_Abort(int id);
        [DllImport("__Internal")] static extern void RealtimeWS_SetTimeout(int id, int milliseconds);

        static readonly Dictionary<int, WebGLTransport> Open_ = new Dictionary<int, WebGLTransport>();
        static readonly Dictionary<int, TaskCompletionSource<bool>> Timers = new Dictionary<int, TaskCompletionSource<bool>>();
        static bool _initialised;
        static int _nextTimer = 1;
        static byte[] _scratch = new byte[64 * 1024];

        int _id;
        ITransportListener _listener;

        static void Init()
        {
            if (_initialised) return;
            _initialised = true;
            RealtimeWS_Init(OnOpen, OnText, OnBinary, OnClose, OnTimer);
        }

        public void Open(string url, IDictionary<string, string> headers, ITransportListener listener)
        {
            // Browsers cannot set headers on a WebSocket: authenticate with a token (?token=).
            Init();
            _listener = listener;
            _id = RealtimeWS_Open(url);
            Open_[_id] = this;
        }

        public void SendText(string text) { RealtimeWS_SendText(_id, text); }
        public void SendBinary(byte[] data, int length) { RealtimeWS_SendBinary(_id, data, length); }
        public void Close(int code, string reason) { RealtimeWS_Close(_id, code, reason ?? ""); }

        public void Abort()
        {
            RealtimeWS_Abort(_id);
            Ended(1006, "aborted", false);
        }

        void Ended(int code, string reason, bool clean)
        {
            if (!Open_.Remove(_id)) return;
            _listener.OnClose(code, reason, clean);
        }

        internal static Task Delay(int milliseconds)
        {
            Init();
            var done = new TaskCompletionSource<bool>();
            int id = _nextTimer++;
            Timers[id] = done;
            RealtimeWS_SetTimeout(id, milliseconds);
            return done.Task;
        }

        static byte[] Copy(IntPtr data, int length)
        {
            if (_scratch.Length < length) _scratch = new byte[Math.Max(length, 2 * _scratch.Length)];
            Marshal.Copy(data, _scratch, 0, length);
            return _scratch;
        }

        [MonoPInvokeCallback(typeof(OpenCallback))]
        static void OnOpen(int id)
        {
            WebGLTransport t;
            if (Open_.TryGetValue(id, out t)) t._listener.OnOpen();
        }

        [MonoPInvokeCallback(typeof(DataCallback))]
        static void OnText(int id, IntPtr data, int length)
        {
            WebGLTransport t;
            if (Open_.TryGetValue(id, out t)) t._listener.OnText(Encoding.UTF8.GetString(Copy(data, length), 0, length));
        }

        [MonoPInvokeCallback(typeof(DataCallback))]
        static void OnBinary(int id, IntPtr data, int length)
        {
            WebGLTransport t;
            if (Open_.TryGetValue(id, out t)) t._listener.OnBinary(Copy(data, length), length);
        }

        [MonoPInvokeCallback(typeof(CloseCallback))]
        static void OnClose(int id, int code, int clean, IntPtr reason, int reasonLength)
        {
            WebGLTransport t;
            if (!Open_.TryGetValue(id, out t)) return;
            // A close frame from the server makes a clean close; a lost connection is 1006.
            string why = reasonLength > 0 ? Encoding.UTF8.GetString(Copy(reason, reasonLength), 0, reasonLength) : "";
            t.Ended(code, why, clean != 0 && code != 1006);
        }

        [MonoPInvokeCallback(typeof(TimerCallback))]
        static void OnTimer(int id)
        {
            TaskCompletionSource<bool> done;
            if (!Timers.TryGetValue(id, out done)) return;
            Timers.Remove(id);
            done.TrySetResult(true);
        }
    }
}
#endif
