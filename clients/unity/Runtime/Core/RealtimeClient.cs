// The C# client of the realtime wire protocol (docs/protocol.md), for Unity and plain .NET/Mono.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Threading.Tasks;

namespace Realtime
{
    /// <summary>Where a client's connection is.</summary>
    public enum ConnectionState
    {
        /// <summary>Dialling and saying hello.</summary>
        Connecting,
        /// <summary>Welcomed: chunks and requests go out at once.</summary>
        Online,
        /// <summary>The connection was lost (or handed to the server's next process): dialling again
        /// with back-off; chunks and requests are kept and sent once the session is back.</summary>
        Resuming,
        /// <summary>The session ended (closed by either side, or not resumed in time).</summary>
        Closed,
    }

    /// <summary>How a <see cref="RealtimeClient"/> connects and delivers.</summary>
    public sealed class RealtimeClientOptions
    {
        /// <summary>Sent in hello.client ("my-game/1.2").</summary>
        public string ClientName = "realtime-unity";
        /// <summary>A session token minted by your backend (sent as ?token=, which WebGL supports too).</summary>
        public string Token;
        /// <summary>An API key (X-Api-Key header; not available in WebGL builds, use a token there).</summary>
        public string ApiKey;
        /// <summary>Which thread runs callbacks (default: the one that calls Pump, Unity's main thread).</summary>
        public CallbackThread Callbacks = CallbackThread.MainThread;
        /// <summary>Resume the session after a lost connection (docs/protocol.md#resuming-a-session).</summary>
        public bool Resume = true;
        /// <summary>Transports (default: ClientWebSocket; WebGL builds use the .jslib bridge).</summary>
        public ITransportFactory Transports;
        /// <summary>Where chunk frames are rented (default: BufferPool.Shared).</summary>
        public BufferPool Pool;
        /// <summary>Called when one of your callbacks throws (default: written to stderr; the
        /// Unity components log it with Debug.LogException). Later callbacks still run.</summary>
        public Action<Exception> OnCallbackException;
    }

    /// <summary>Milliseconds on a steady clock, and Unix time in ms with sub-ms resolution.</summary>
    public static class RealtimeClock
    {
        static readonly Stopwatch Watch = Stopwatch.StartNew();
        static readonly double UnixStartMs = (DateTime.UtcNow - new DateTime(1970, 1, 1, 0, 0, 0, DateTimeKind.Utc)).TotalMilliseconds;

        /// <summary>Milliseconds since the process first asked (monotonic).</summary>
        public static double NowMs() { return Watch.Elapsed.TotalMilliseconds; }

        /// <summary>Wall clock, Unix ms (for ping).</summary>
        public static double UnixMs() { return UnixStartMs + Watch.Elapsed.TotalMilliseconds; }
    }

    /// <summary>A connection to a realtime server: one session, many streams.
    ///
    /// Results, events and errors are delivered through the streams' callbacks, on the thread
    /// <see cref="RealtimeClientOptions.Callbacks"/> says: by default queued until
    /// <see cref="Pump"/> (call it from Update). A lost connection is dialled again with jittered
    /// back-off and the session resumed for as long as the server keeps it: every answer arrives
    /// exactly once, in order, and chunks the server did not get are sent again.</summary>
    public sealed class RealtimeClient : IDisposable
    {
        sealed class Pending
        {
            public TaskCompletionSource<object> Done;
            public string Text;
        }

        /// <summary>One WebSocket connection of the session (a resume makes a new one).</summary>
        sealed class Link : ITransportListener
        {
            public readonly RealtimeClient Client;
            public readonly IRealtimeTransport Transport;
            public readonly bool Resume;
            public readonly TaskCompletionSource<JsonValue> Greeting =
                new TaskCompletionSource<JsonValue>(TaskCreationOptions.RunContinuationsAsynchronously);
            public bool Greeted;
            public volatile bool Detached;

            public Link(RealtimeClient client, bool resume)
            {
                Client = client;
                Resume = resume;
                Transport = client._transports.Create();
            }

            public void OnOpen() { if (!Detached) Client.SayHello(this); }
            public void OnText(string text) { if (!Detached) Client.Receive(this, text, null, 0); }
            public void OnBinary(byte[] data, int length) { if (!Detached) Client.Receive(this, null, data, length); }
            public void OnClose(int code, string reason, bool closeFrameReceived)
            {
                if (!Detached) Client.Lost(this, code, reason, closeFrameReceived);
            }
        }

        internal readonly object Gate = new object();
        internal readonly BufferPool Pool;
        readonly string _url;
        readonly RealtimeClientOptions _options;
        readonly ITransportFactory _transports;
        readonly Dispatcher _dispatcher;
        readonly Dictionary<uint, RealtimeStream> _streams = new Dictionary<uint, RealtimeStream>();
        /// <summary>Requests sent and not answered, by the key of their answer ("opened:1",
        /// "closed:1", "pong:7"): sent again on a resume if the server did not get them.</summary>
        readonly Dictionary<string, Pending> _waiting = new Dictionary<string, Pending>();
        readonly Random _jitter = new Random();
        Link _link;
        long _received;
        uint _nextStream = 1;
        uint _nextPing = 1;
        bool _handedOff;
        bool _closing;
        string _resumeToken;

        /// <summary>The session's welcome (catalog, limits); replaced by a resumed one.</summary>
        public JsonValue Welcome { get; private set; }
        /// <summary>Where the connection is (see <see cref="ConnectionState"/>).</summary>
        public ConnectionState State { get; private set; }
        /// <summary>Times this client resumed its session after a lost connection.</summary>
        public int Resumes { get; private set; }
        /// <summary>The last going_away notice, or null.</summary>
        public JsonValue GoingAway { get; private set; }

        /// <summary>Errors about no open stream (rate_limited, results_dropped, bad frames).</summary>
        public event Action<RealtimeException> OnError;
        /// <summary>The server is shutting down (the client resumes by itself when it hands off).</summary>
        public event Action<JsonValue> OnGoingAway;
        /// <summary>The connection state changed (e.g. to show "reconnecting").</summary>
        public event Action<ConnectionState> OnStateChanged;
        /// <summary>The session ended and was not (or could not be) resumed.</summary>
        public event Action<RealtimeDisconnectedException> OnDisconnected;

        RealtimeClient(string url, RealtimeClientOptions options)
        {
            _url = url;
            _options = options ?? new RealtimeClientOptions();
            _transports = _options.Transports ?? new ClientWebSocketFactory();
            Pool = _options.Pool ?? BufferPool.Shared;
            _dispatcher = new Dispatcher(Run);
            State = ConnectionState.Connecting;
        }

        /// <summary>Connect, say hello and complete with the client once welcomed. Throws
        /// <see cref="RealtimeException"/> if the server refuses the hello, or
        /// <see cref="RealtimeDisconnectedException"/> if it cannot be reached.</summary>
        public static async Task<RealtimeClient> ConnectAsync(string url, RealtimeClientOptions options = null)
        {
            var client = new RealtimeClient(url, options);
            var link = client.Dial(false);
            try
            {
                await link.Greeting.Task.ConfigureAwait(false);
            }
            catch (Exception)
            {
                link.Detached = true;
                link.Transport.Abort();
                throw;
            }
            return client;
        }

        /// <summary>The server's model catalog (the welcome's <c>models</c>).</summary>
        public JsonValue Models { get { return Welcome["models"]; } }

        /// <summary>The catalog entry of a model (its default version unless one is named), or null.</summary>
        public JsonValue Model(string name, string version = null)
        {
            var models = Models;
            for (int i = 0; i < models.Count; i++)
            {
                var m = models[i];
                if (m["name"].AsString() != name) continue;
                if (version != null ? m["version"].AsString() == version : m["default"].AsBool()) return m;
            }
            return null;
        }

        /// <summary>Run queued callbacks (results, events, errors) on this thread; call it once a
        /// frame from Update. Returns how many ran.</summary>
        public int Pump() { return _dispatcher.Pump(); }

        /// <summary>Open a stream. Kind and dtype default to the catalog's; completes with the
        /// stream once the server opened it, or throws the typed error (unknown_model,
        /// kind_mismatch, dtype_mismatch, shape_mismatch, ...).</summary>
        public async Task<RealtimeStream> OpenAsync(OpenOptions o)
        {
            if (o == null || string.IsNullOrEmpty(o.Model)) throw new ArgumentException("OpenOptions.Model is required");
            var entry = Model(o.Model, o.Version);
            var input = entry != null ? entry["input"] : JsonValue.Null;
            StreamKind kind = o.Kind ?? KindOf(entry != null ? entry["kind"].AsString() : null);
            DType dtype;
            if (o.DType.HasValue) dtype = o.DType.Value;
            else if (!Wire.TryParseDType(input["dtype"].AsString(), out dtype)) dtype = DType.Float32;
            RealtimeStream stream;
            string key;
            lock (Gate)
            {
                uint id = o.StreamId ?? NextFreeStreamId();
                var w = new JsonWriter().BeginObject();
                w.Key("type").Value("open").Key("stream").Value((long)id).Key("model").Value(o.Model);
                if (o.Version != null) w.Key("version").Value(o.Version);
                w.Key("kind").Value(Wire.Name(kind)).Key("dtype").Value(Wire.Name(dtype));
                if (o.Shape != null)
                {
                    w.Key("shape").BeginArray();
                    foreach (int d in o.Shape) w.Value((long)d);
                    w.EndArray();
                }
                if (o.SampleRate.HasValue) w.Key("sample_rate").Value((long)o.SampleRate.Value);
                if (o.DeadlineMs.HasValue) w.Key("deadline_ms").Value(o.DeadlineMs.Value);
                w.Key("results").Value(o.Results == ResultMode.Binary ? "binary" : "json");
                if (o.Overflow != Overflow.Default) w.Key("overflow").Value(o.Overflow == Overflow.Reject ? "reject" : "drop_oldest");
                w.Key("options");
                if (o.Options != null) w.Value((object)o.Options); else w.BeginObject().EndObject();
                string text = w.EndObject().ToString();
                // The stream exists before the server can answer, so no result is ever unrouted.
                stream = new RealtimeStream(this, id, dtype, text);
                _streams[id] = stream;
                key = "opened:" + id;
            }
            try
            {
                stream.Opened = (Opened)await Request(key, stream.OpenText).ConfigureAwait(false);
            }
            catch (Exception)
            {
                lock (Gate) if (_streams.ContainsKey(stream.Id) && _streams[stream.Id] == stream) _streams.Remove(stream.Id);
                throw;
            }
            return stream;
        }

        /// <summary>Round trip and server-minus-client clock offset.</summary>
        public async Task<PingResult> PingAsync()
        {
            uint id;
            lock (Gate) id = _nextPing++;
            double t0 = RealtimeClock.UnixMs();
            string text = new JsonWriter().BeginObject().Key("type").Value("ping").Key("id").Value((long)id)
                .Key("t").Value(t0).EndObject().ToString();
            var pong = (JsonValue)await Request("pong:" + id, text).ConfigureAwait(false);
            double t1 = RealtimeClock.UnixMs();
            return new PingResult { RoundTripMs = t1 - t0, ClockOffsetMs = pong["server_time"].AsDouble() - (t0 + t1) / 2 };
        }

        /// <summary>Close the connection with a close frame: the session ends (it is not kept to resume).</summary>
        public void Close()
        {
            Link link;
            lock (Gate)
            {
                if (State == ConnectionState.Closed) return;
                _closing = true;
                link = _link;
            }
            if (link != null) link.Transport.Close(1000, "");
            End(null, 1000, "closed by the client");
        }

        public void Dispose() { Close(); }

        /// <summary>Drop the connection without a close frame, as a lost network does: the client
        /// then resumes the session by itself. For testing an app's behaviour across a drop.</summary>
        public void AbortConnection()
        {
            Link link;
            lock (Gate) link = _link;
            if (link != null) link.Transport.Abort();
        }

        // --- internals ------------------------------------------------------------------------

        static StreamKind KindOf(string name)
        {
            return name == "audio" ? StreamKind.Audio : name == "video" ? StreamKind.Video : StreamKind.Tensor;
        }

        uint NextFreeStreamId()
        {
            while (_streams.ContainsKey(_nextStream)) _nextStream++;
            return _nextStream++;
        }

        Link Dial(bool resume)
        {
            var link = new Link(this, resume);
            lock (Gate) _link = link;
            var headers = new Dictionary<string, string>();
            if (_options.ApiKey != null) headers["X-Api-Key"] = _options.ApiKey;
            string url = _url;
            if (_options.Token != null) url += (url.Contains("?") ? "&" : "?") + "token=" + Uri.EscapeDataString(_options.Token);
            // A resume says so in its URL: a full server refusing a crowd at the door lets it in.
            if (resume) url += (url.Contains("?") ? "&" : "?") + "resume=1";
            link.Transport.Open(url, headers, link);
            return link;
        }

        void SayHello(Link link)
        {
            var w = new JsonWriter().BeginObject().Key("type").Value("hello").Key("protocol").Value((long)Wire.ProtocolVersion)
                .Key("client").Value(_options.ClientName ?? "");
            if (link.Resume)
            {
                lock (Gate) w.Key("resume").Value(_resumeToken).Key("received").Value(_received);
            }
            link.Transport.SendText(w.EndObject().ToString());
        }

        bool MaySend { get { return State == ConnectionState.Online && !_handedOff; } }

        internal void SendChunk(RealtimeStream stream, uint seq, PooledFrame frame)
        {
            // Under Gate (RealtimeStream.Send holds it): kept until answered, sent if online.
            if (State == ConnectionState.Closed)
            {
                Pool.Return(frame.Buffer);
                throw new RealtimeDisconnectedException("the session is closed", 1000);
            }
            stream.Unanswered[seq] = frame;
            if (MaySend) _link.Transport.SendBinary(frame.Buffer, frame.Length);
        }

        async Task<object> Request(string key, string text)
        {
            var pending = new Pending
            {
                Done = new TaskCompletionSource<object>(TaskCreationOptions.RunContinuationsAsynchronously),
                Text = text,
            };
            lock (Gate)
            {
                if (State == ConnectionState.Closed) throw new RealtimeDisconnectedException("the session is closed", 1000);
                _waiting[key] = pending;
                if (MaySend) _link.Transport.SendText(text);
            }
            try
            {
                return await pending.Done.Task.ConfigureAwait(false);
            }
            finally
            {
                lock (Gate) if (_waiting.ContainsKey(key) && _waiting[key] == pending) _waiting.Remove(key);
            }
        }

        internal Task<Closed> CloseStream(RealtimeStream stream)
        {
            string text = new JsonWriter().BeginObject().Key("type").Value("close").Key("stream").Value((long)stream.Id)
                .EndObject().ToString();
            return Request("closed:" + stream.Id, text).ContinueWith(t => (Closed)t.Result, TaskContinuationOptions.ExecuteSynchronously);
        }

        void Receive(Link link, string text, byte[] data, int length)
        {
            JsonValue msg = null;
            try
            {
                if (text != null) msg = JsonValue.Parse(text);
                lock (Gate)
                {
                    if (link != _link) return;
                    if (!link.Greeted)
                    {
                        if (msg == null) return;  // nothing but the welcome is expected before it
                        Greet(link, msg);
                        return;
                    }
                    _received++;
                    if (msg != null) Route(msg);
                    else RouteFrame(Wire.ParseFrame(data, length));
                }
            }
            catch (Exception e)
            {
                // A malformed message from the server: tell the app, keep going.
                _dispatcher.Post(Dispatcher.Kind.ClientError, null,
                    e as RealtimeException ?? new RealtimeException(ErrorCode.BadMessage, "unreadable message from the server: " + e.Message));
            }
            if (_options.Callbacks == CallbackThread.Worker) _dispatcher.Pump();
        }

        /// <summary>The first message on a connection: the welcome (a new or a resumed session)
        /// or the error refusing the hello. Runs before any message that follows it, so a resume
        /// is in place before the replay.</summary>
        void Greet(Link link, JsonValue msg)
        {
            string type = msg["type"].AsString();
            if (type == "error")
            {
                link.Detached = true;
                var refused = RealtimeException.FromMessage(msg);
                link.Transport.Close(1000, "");
                link.Greeting.TrySetException(refused);
                return;
            }
            if (type != "welcome")
            {
                link.Greeting.TrySetException(new RealtimeException(ErrorCode.BadMessage, "expected welcome, got " + type));
                return;
            }
            link.Greeted = true;
            var resumed = msg["resumed"];
            if (link.Resume && resumed.IsObject) Resumed(resumed);
            else _received = 0;
            Welcome = msg;
            if (msg["resume_token"].IsString) _resumeToken = msg["resume_token"].AsString();
            _handedOff = false;
            SetState(ConnectionState.Online);
            // Requests asked while connecting go now (a new session never had them).
            if (!link.Resume) foreach (var p in _waiting.Values) link.Transport.SendText(p.Text);
            link.Greeting.TrySetResult(msg);
        }

        /// <summary>Take the session back: count as the server does, then send again the requests
        /// and chunks it did not get (docs/protocol.md#resuming-a-session).</summary>
        void Resumed(JsonValue resumed)
        {
            _received = resumed["from"].AsLong();
            var held = new Dictionary<uint, JsonValue>();
            var streams = resumed["streams"];
            for (int i = 0; i < streams.Count; i++) held[(uint)streams[i]["stream"].AsLong()] = streams[i];
            var transport = _link.Transport;
            foreach (var kv in _waiting)
            {
                // Answers the server produced are in the replay; requests it never got go again.
                string kind = kv.Key.Substring(0, kv.Key.IndexOf(':'));
                uint id = uint.Parse(kv.Key.Substring(kv.Key.IndexOf(':') + 1), System.Globalization.CultureInfo.InvariantCulture);
                JsonValue s;
                bool isHeld = held.TryGetValue(id, out s);
                if (kind == "pong" || (kind == "opened" && !isHeld) || (kind == "closed" && isHeld && !s["closing"].AsBool()))
                    transport.SendText(kv.Value.Text);
            }
            var seqs = new List<uint>();
            foreach (var stream in _streams.Values)
            {
                JsonValue s;
                if (!held.TryGetValue(stream.Id, out s)) continue;
                long got = s["received"].AsLong(-1);
                seqs.Clear();
                foreach (var seq in stream.Unanswered.Keys) if (seq > got) seqs.Add(seq);
                seqs.Sort();
                foreach (var seq in seqs)
                {
                    var f = stream.Unanswered[seq];
                    transport.SendBinary(f.Buffer, f.Length);
                }
            }
            Resumes++;
        }

        void Route(JsonValue m)
        {
            string type = m["type"].AsString();
            RealtimeStream stream = null;
            if (m["stream"].IsNumber) _streams.TryGetValue((uint)m["stream"].AsLong(), out stream);
            switch (type)
            {
                case "result":
                {
                    if (stream == null) return;
                    var r = new Result { Stream = stream.Id, Seq = (uint)m["seq"].AsLong(), T = m["t"].AsDouble() };
                    foreach (var kv in m["outputs"].Members) r.Outputs[kv.Key] = Tensor.FromJson(kv.Value);
                    var windows = m["windows"];
                    if (windows.IsArray)
                    {
                        r.Windows = new double[windows.Count];
                        for (int i = 0; i < r.Windows.Length; i++) r.Windows[i] = windows[i].AsDouble();
                    }
                    var timing = m["timing"];
                    r.QueueMs = timing["queue_ms"].AsDouble(0);
                    r.InferMs = timing["infer_ms"].AsDouble(0);
                    r.Batch = timing["batch"].AsInt();
                    Answered(stream, r.Seq);
                    _dispatcher.Post(Dispatcher.Kind.Result, stream, r);
                    return;
                }
                case "event":
                    if (stream == null) return;
                    _dispatcher.Post(Dispatcher.Kind.Event, stream, new RealtimeEvent
                    {
                        Stream = stream.Id, Name = m["event"].AsString(), T = m["t"].AsDouble(), Fields = m,
                    });
                    return;
                case "error":
                {
                    var err = RealtimeException.FromMessage(m);
                    if (err.Seq == null && err.Stream != null)
                    {
                        // An error about a request on a stream (open, close): fail that request.
                        foreach (var kind in new[] { "opened:", "closed:" })
                        {
                            Pending p;
                            if (_waiting.TryGetValue(kind + err.Stream.Value, out p))
                            {
                                _waiting.Remove(kind + err.Stream.Value);
                                p.Done.TrySetException(err);
                                return;
                            }
                        }
                    }
                    if (stream != null && err.Seq != null)
                    {
                        Answered(stream, (uint)err.Seq.Value);
                        stream.Partial.Remove((uint)err.Seq.Value);
                        _dispatcher.Post(Dispatcher.Kind.Error, stream, err);
                    }
                    else _dispatcher.Post(Dispatcher.Kind.ClientError, null, err);
                    return;
                }
                case "opened":
                {
                    Pending p;
                    if (stream == null || !_waiting.TryGetValue("opened:" + stream.Id, out p)) return;
                    _waiting.Remove("opened:" + stream.Id);
                    var outputs = m["outputs"];
                    var names = new string[outputs.Count];
                    for (int i = 0; i < names.Length; i++) names[i] = outputs[i]["name"].AsString();
                    p.Done.TrySetResult(new Opened
                    {
                        Stream = stream.Id, Model = m["model"].AsString(), Version = m["version"].AsString(),
                        DeadlineMs = m["deadline_ms"].AsDouble(), Overflow = m["overflow"].AsString(),
                        OutputNames = names, Message = m,
                    });
                    stream.Opened = (Opened)p.Done.Task.Result;
                    return;
                }
                case "closed":
                {
                    if (stream == null) return;
                    var closed = new Closed { Stream = stream.Id, Results = m["results"].AsLong(), Errors = m["errors"].AsLong() };
                    _streams.Remove(stream.Id);
                    foreach (var f in stream.Unanswered.Values) Pool.Return(f.Buffer);
                    stream.Unanswered.Clear();
                    _dispatcher.Post(Dispatcher.Kind.Closed, stream, closed);
                    Pending p;
                    if (_waiting.TryGetValue("closed:" + stream.Id, out p))
                    {
                        _waiting.Remove("closed:" + stream.Id);
                        p.Done.TrySetResult(closed);
                    }
                    return;
                }
                case "pong":
                {
                    Pending p;
                    string key = "pong:" + m["id"].AsLong();
                    if (_waiting.TryGetValue(key, out p))
                    {
                        _waiting.Remove(key);
                        p.Done.TrySetResult(m);
                    }
                    return;
                }
                case "going_away":
                    GoingAway = m;
                    if (m["resume_token"].IsString && _options.Resume)
                    {
                        // The session moves to the server's next process: hold chunks and requests
                        // until it resumes there (the close, 1001, follows the answers).
                        _resumeToken = m["resume_token"].AsString();
                        _handedOff = true;
                    }
                    _dispatcher.Post(Dispatcher.Kind.GoingAway, null, m);
                    return;
            }
        }

        void RouteFrame(ResultFrame f)
        {
            RealtimeStream stream;
            if (f.Type != Wire.FrameResult || !_streams.TryGetValue(f.Stream, out stream) || f.Count == 0) return;
            ResultFrame[] parts;
            if (!stream.Partial.TryGetValue(f.Seq, out parts))
            {
                parts = new ResultFrame[f.Count];
                stream.Partial[f.Seq] = parts;
            }
            if (f.Index >= parts.Length) return;
            parts[f.Index] = f;
            foreach (var p in parts) if (p == null) return;
            stream.Partial.Remove(f.Seq);
            var names = stream.Opened != null ? stream.Opened.OutputNames : new string[0];
            var r = new Result { Stream = f.Stream, Seq = f.Seq, T = f.T, QueueMs = f.Extra0 / 1000.0, InferMs = f.Extra1 / 1000.0 };
            for (int i = 0; i < parts.Length && i < names.Length; i++) r.Outputs[names[i]] = parts[i].Tensor;
            if (parts.Length > names.Length) r.Windows = parts[parts.Length - 1].Tensor.Data;
            Answered(stream, f.Seq);
            _dispatcher.Post(Dispatcher.Kind.Result, stream, r);
        }

        void Answered(RealtimeStream stream, uint seq)
        {
            PooledFrame f;
            if (stream.Unanswered.TryGetValue(seq, out f))
            {
                stream.Unanswered.Remove(seq);
                Pool.Return(f.Buffer);
            }
        }

        void Lost(Link link, int code, string reason, bool closeFrameReceived)
        {
            bool resume;
            lock (Gate)
            {
                if (link != _link || State == ConnectionState.Closed) return;
                if (!link.Greeted)
                {
                    link.Greeting.TrySetException(new RealtimeDisconnectedException(
                        "cannot connect to " + _url + " (" + code + " " + reason + ")", code));
                    return;  // ConnectAsync or the resume loop decides
                }
                resume = !_closing && _options.Resume && _resumeToken != null
                         && (!closeFrameReceived || (code == 1001 && _handedOff));
                if (resume) SetState(ConnectionState.Resuming);
            }
            if (resume) ResumeLoop();
            else End(null, code, _closing ? "closed by the client" : "connection closed (" + code + " " + reason + ")");
            if (_options.Callbacks == CallbackThread.Worker) _dispatcher.Pump();
        }

        /// <summary>Dial again with jittered exponential back-off (50 ms doubling to 2 s) for as long
        /// as the server keeps the session (welcome.limits.resume_seconds).</summary>
        async void ResumeLoop()
        {
            try
            {
                await Resume().ConfigureAwait(false);
            }
            catch (Exception e)
            {
                // A bug here must not take the app down (an async void throws on the thread pool).
                End(null, 1006, "resuming failed: " + e.Message);
            }
            if (_options.Callbacks == CallbackThread.Worker) _dispatcher.Pump();
        }

        async Task Resume()
        {
            double giveUp = RealtimeClock.NowMs() + 1000.0 * Welcome["limits"]["resume_seconds"].AsDouble(30.0);
            int delay = 50;
            while (true)
            {
                lock (Gate) if (_closing || State == ConnectionState.Closed) return;
                var link = Dial(true);
                try
                {
                    await link.Greeting.Task.ConfigureAwait(false);
                    break;  // resumed: Greet applied it before any replayed message
                }
                catch (RealtimeException refused)
                {
                    // resume_unknown or resume_expired: the session is gone, start a new one.
                    End(refused, 1000, "the session could not be resumed: " + refused.Message);
                    break;
                }
                catch (Exception)
                {
                    link.Detached = true;
                    link.Transport.Abort();
                }
                if (RealtimeClock.NowMs() + delay > giveUp)
                {
                    End(new RealtimeException(ErrorCode.ResumeExpired, "could not reach the server within resume_seconds"), 1006,
                        "the connection was lost and the server could not be reached again");
                    break;
                }
                double jitter;
                lock (_jitter) jitter = 0.5 + _jitter.NextDouble();
                await _transports.Delay((int)(delay * jitter)).ConfigureAwait(false);
                delay = Math.Min(2 * delay, 2000);
            }
        }

        /// <summary>The session is over: fail what waits, release kept chunks, tell the app.</summary>
        void End(RealtimeException cause, int code, string why)
        {
            List<Pending> waiting;
            int unanswered = 0;
            lock (Gate)
            {
                if (State == ConnectionState.Closed) return;
                if (_link != null) _link.Detached = true;
                SetState(ConnectionState.Closed);
                waiting = new List<Pending>(_waiting.Values);
                _waiting.Clear();
                foreach (var s in _streams.Values)
                {
                    unanswered += s.Unanswered.Count;
                    foreach (var f in s.Unanswered.Values) Pool.Return(f.Buffer);
                    s.Unanswered.Clear();
                }
                if (!_closing)
                    _dispatcher.Post(Dispatcher.Kind.Disconnected, null, new RealtimeDisconnectedException(
                        why + (unanswered > 0 ? "; " + unanswered + " chunks got no answer" : ""), code, cause));
            }
            var lost = new RealtimeDisconnectedException(why, code, cause);
            foreach (var p in waiting) p.Done.TrySetException(lost);
        }

        void SetState(ConnectionState state)
        {
            if (State == state) return;
            State = state;
            _dispatcher.Post(Dispatcher.Kind.Status, null, state);
        }

        void Run(Dispatcher.Delivery d)
        {
            try
            {
                switch (d.Kind)
                {
                    case Dispatcher.Kind.ClientError: { var h = OnError; if (h != null) h((RealtimeException)d.Payload); break; }
                    case Dispatcher.Kind.GoingAway: { var h = OnGoingAway; if (h != null) h((JsonValue)d.Payload); break; }
                    case Dispatcher.Kind.Status: { var h = OnStateChanged; if (h != null) h((ConnectionState)d.Payload); break; }
                    case Dispatcher.Kind.Disconnected: { var h = OnDisconnected; if (h != null) h((RealtimeDisconnectedException)d.Payload); break; }
                    default: d.Stream.Deliver(d.Kind, d.Payload); break;
                }
            }
            catch (Exception e)
            {
                var report = _options.OnCallbackException;
                if (report != null) report(e);
                else Console.Error.WriteLine("realtime: a callback threw: " + e);
            }
        }
    }
}
