// The WebSocket underneath a RealtimeClient: System.Net.WebSockets.ClientWebSocket on every
// platform but WebGL, where the browser's WebSocket is reached through a .jslib (see
// Runtime/Unity/WebGLTransport.cs). The client only sees this interface.
using System;
using System.Collections.Generic;
using System.Net.WebSockets;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace Realtime
{
    /// <summary>What a transport tells its owner. Calls come from one thread at a time, in order.</summary>
    public interface ITransportListener
    {
        void OnOpen();
        void OnText(string text);
        /// <summary>A binary message; <paramref name="data"/> is only valid during the call.</summary>
        void OnBinary(byte[] data, int length);
        /// <summary>The connection ended (or could not open). <paramref name="closeFrameReceived"/>
        /// tells a close by the server (a close frame) from a lost connection.</summary>
        void OnClose(int code, string reason, bool closeFrameReceived);
    }

    /// <summary>One WebSocket connection. Sends are queued and go out one at a time, in order.</summary>
    public interface IRealtimeTransport
    {
        /// <summary>Start connecting; the listener hears OnOpen or OnClose.</summary>
        void Open(string url, IDictionary<string, string> headers, ITransportListener listener);
        void SendText(string text);
        /// <summary>Queue a binary message. The bytes must stay untouched until the client
        /// releases them (it keeps chunk frames until their answer arrives).</summary>
        void SendBinary(byte[] data, int length);
        /// <summary>Close with a close frame (the session ends on the server).</summary>
        void Close(int code, string reason);
        /// <summary>Drop the connection at once, without a close frame (as a network loss would).</summary>
        void Abort();
    }

    /// <summary>Makes transports, and waits (resume back-off) in a way the platform supports.</summary>
    public interface ITransportFactory
    {
        IRealtimeTransport Create();
        Task Delay(int milliseconds);
    }

    /// <summary>Transports over <see cref="ClientWebSocket"/>: a receive loop and a send loop per
    /// connection (ClientWebSocket allows one SendAsync at a time).</summary>
    public sealed class ClientWebSocketFactory : ITransportFactory
    {
        public IRealtimeTransport Create() { return new ClientWebSocketTransport(); }
        public Task Delay(int milliseconds) { return Task.Delay(milliseconds); }
    }

    /// <summary>A <see cref="ClientWebSocket"/> with a FIFO send queue drained by one loop.</summary>
    public sealed class ClientWebSocketTransport : IRealtimeTransport
    {
        struct Outgoing
        {
            public byte[] Data;
            public int Length;
            public bool Text;
            public int CloseCode;  // > 0: a close frame, not a message
            public string Reason;
        }

        readonly ClientWebSocket _ws = new ClientWebSocket();
        readonly CancellationTokenSource _cancel = new CancellationTokenSource();
        readonly Queue<Outgoing> _outbox = new Queue<Outgoing>();
        readonly SemaphoreSlim _ready = new SemaphoreSlim(0);
        ITransportListener _listener;
        int _ended;

        public void Open(string url, IDictionary<string, string> headers, ITransportListener listener)
        {
            _listener = listener;
            if (headers != null)
                foreach (var h in headers) _ws.Options.SetRequestHeader(h.Key, h.Value);
            Task.Run(() => Run(new Uri(url)));
        }

        async Task Run(Uri uri)
        {
            try
            {
                await _ws.ConnectAsync(uri, _cancel.Token).ConfigureAwait(false);
            }
            catch (Exception e)
            {
                End(1006, "cannot connect: " + e.Message, false);
                return;
            }
            _listener.OnOpen();
            var sending = SendLoop();
            await ReceiveLoop().ConfigureAwait(false);
            _ready.Release();
            try { await sending.ConfigureAwait(false); } catch (Exception) { }
        }

        async Task ReceiveLoop()
        {
            var buf = new byte[64 * 1024];
            try
            {
                while (true)
                {
                    int length = 0;
                    WebSocketReceiveResult r;
                    do
                    {
                        if (length == buf.Length) Array.Resize(ref buf, 2 * buf.Length);
                        r = await _ws.ReceiveAsync(new ArraySegment<byte>(buf, length, buf.Length - length), _cancel.Token).ConfigureAwait(false);
                        length += r.Count;
                    } while (!r.EndOfMessage && r.MessageType != WebSocketMessageType.Close);
                    if (r.MessageType == WebSocketMessageType.Close)
                    {
                        int code = r.CloseStatus.HasValue ? (int)r.CloseStatus.Value : 1005;
                        End(code, r.CloseStatusDescription ?? "", true);
                        try { _ws.Abort(); } catch (Exception) { }
                        return;
                    }
                    if (Volatile.Read(ref _ended) != 0) return;
                    if (r.MessageType == WebSocketMessageType.Text) _listener.OnText(Encoding.UTF8.GetString(buf, 0, length));
                    else _listener.OnBinary(buf, length);
                }
            }
            catch (Exception e)
            {
                End(1006, e.Message, false);
            }
        }

        async Task SendLoop()
        {
            while (true)
            {
                await _ready.WaitAsync().ConfigureAwait(false);
                Outgoing m;
                lock (_outbox)
                {
                    if (Volatile.Read(ref _ended) != 0 || _outbox.Count == 0) return;
                    m = _outbox.Dequeue();
                }
                try
                {
                    if (m.CloseCode > 0)
                    {
                        // The close goes through the queue: one sender at a time, after what was queued.
                        await _ws.CloseOutputAsync((WebSocketCloseStatus)m.CloseCode, m.Reason, _cancel.Token).ConfigureAwait(false);
                        var bound = Task.Delay(2000);  // the server's close frame ends the receive loop
                        if (await Task.WhenAny(bound, _closed.Task).ConfigureAwait(false) == bound) Abort();
                        return;
                    }
                    var type = m.Text ? WebSocketMessageType.Text : WebSocketMessageType.Binary;
                    await _ws.SendAsync(new ArraySegment<byte>(m.Data, 0, m.Length), type, true, _cancel.Token).ConfigureAwait(false);
                }
                catch (Exception e)
                {
                    End(1006, e.Message, false);
                    try { _ws.Abort(); } catch (Exception) { }
                    return;
                }
            }
        }

        readonly TaskCompletionSource<bool> _closed = new TaskCompletionSource<bool>();

        void Enqueue(byte[] data, int length, bool text)
        {
            lock (_outbox)
            {
                if (Volatile.Read(ref _ended) != 0) return;
                _outbox.Enqueue(new Outgoing { Data = data, Length = length, Text = text });
            }
            _ready.Release();
        }

        public void SendText(string text)
        {
            var bytes = Encoding.UTF8.GetBytes(text);
            Enqueue(bytes, bytes.Length, true);
        }

        public void SendBinary(byte[] data, int length) { Enqueue(data, length, false); }

        public void Close(int code, string reason)
        {
            lock (_outbox)
            {
                if (Volatile.Read(ref _ended) != 0) return;
                _outbox.Enqueue(new Outgoing { CloseCode = code, Reason = reason ?? "" });
            }
            _ready.Release();
        }

        public void Abort()
        {
            End(1006, "aborted", false);
            try { _cancel.Cancel(); } catch (Exception) { }
            try { _ws.Abort(); } catch (Exception) { }
        }

        void End(int code, string reason, bool closeFrameReceived)
        {
            if (Interlocked.Exchange(ref _ended, 1) != 0) return;
            lock (_outbox) _outbox.Clear();
            _closed.TrySetResult(true);
            _ready.Release();
            _listener.OnClose(code, reason, closeFrameReceived);
        }
    }
}
