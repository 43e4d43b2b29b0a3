// The CI check of the C# client (tests/test_unity.py compiles it with Mono's mcs and runs it
// against a real `realtime serve`). It plays the parts a Unity app plays, through the public API
// only, and prints what it saw as one JSON object per line; the Python test asserts on them.
//
//   mono ConsoleCheck.exe ws://127.0.0.1:PORT/ speech_48k_stereo.f32   (or "none": no speech check)
//
// A TCP relay between the client and the server lets the check cut the connection as a network
// would (both sockets dropped, no close frame), to show the session resume.
using System;
using System.Collections.Generic;
using System.IO;
using System.Net;
using System.Net.Sockets;
using System.Threading;
using System.Threading.Tasks;
using System.Globalization;
using System.Runtime.InteropServices;
using Realtime;

static class ConsoleCheck
{
    static int _mainThread;
    /// <summary>Deadline of the check's streams: CI machines are busy, and a chunk skipped for
    /// its deadline would make the check fail for the server's load, not the client's fault.</summary>
    const double Patient = 10000;
    static readonly List<RealtimeClient> Pumped = new List<RealtimeClient>();

    static void Emit(JsonWriter w) { Console.WriteLine(w.EndObject().ToString()); Console.Out.Flush(); }

    static JsonWriter Line(string check) { return new JsonWriter().BeginObject().Key("check").Value(check); }

    /// <summary>Wait for a task while pumping callbacks on this (the "main") thread, as a Unity
    /// app's Update would.</summary>
    static T Wait<T>(Task<T> task, double timeoutMs = 30000)
    {
        var pacer = new Pacer();
        while (!task.IsCompleted)
        {
            foreach (var c in Pumped) c.Pump();
            if (pacer.ElapsedMs > timeoutMs) throw new TimeoutException("timed out waiting");
            Thread.Sleep(1);
        }
        foreach (var c in Pumped) c.Pump();
        return task.GetAwaiter().GetResult();
    }

    static void PumpUntil(Func<bool> done, double timeoutMs = 30000)
    {
        var pacer = new Pacer();
        while (true)
        {
            foreach (var c in Pumped) c.Pump();
            if (done()) return;
            if (pacer.ElapsedMs > timeoutMs) throw new TimeoutException("timed out waiting");
            Thread.Sleep(1);
        }
    }

    [DllImport("libc", EntryPoint = "_exit")]
    static extern void ExitNow(int code);

    static int Main(string[] args)
    {
        int code = Run(args);
        Console.Out.Flush();
        // Every line is out. Leave without Mono's shutdown: Mono 6.8 aborts background threads
        // at exit, and an abort that lands while the timer thread sorts its timers (a Task.Delay
        // the client's close path has just started) comes out as an unhandled
        // InvalidOperationException and exit code 1 after every check passed (mono/mono#15418,
        // fixed in Mono 6.12 by #20467; Debian ships 6.8). Seen once in CI.
        ExitNow(code);
        return code;
    }

    static int Run(string[] args)
    {
        _mainThread = Thread.CurrentThread.ManagedThreadId;
        // A culture that writes 0,5: every number on the wire must still be 0.5.
        Thread.CurrentThread.CurrentCulture = new System.Globalization.CultureInfo("de-DE");
        CultureInfo.DefaultThreadCurrentCulture = Thread.CurrentThread.CurrentCulture;
        string url = args[0];
        if (args[1] == "handoff") return Handoff(url);
        var relay = new Relay(new Uri(url).Port);
        string relayed = "ws://127.0.0.1:" + relay.Port + "/";
        try
        {
            Codes();
            Json();
            Resampler();
            var client = Wait(RealtimeClient.ConnectAsync(relayed, new RealtimeClientOptions { ClientName = "unity-ci-check" }));
            Pumped.Add(client);
            Emit(Line("welcome").Key("session").Value(client.Welcome["session"].AsString())
                .Key("models").Value(ModelNames(client)).Key("resume_seconds").Value(client.Welcome["limits"]["resume_seconds"].AsDouble()));
            if (args[1] != "none") Speech(client, args[1]);  // the clip is in ../shared
            var reference = Pose(client, url);
            Resume(client, relay, reference);
            BadOpens(client);
            var ping = Wait(client.PingAsync());
            Emit(Line("ping").Key("rtt_ms").Value(ping.RoundTripMs).Key("offset_ms").Value(ping.ClockOffsetMs));
            Emit(Line("pool").Key("created").Value((long)BufferPool.Shared.Created).Key("idle").Value((long)BufferPool.Shared.Idle));
            client.Close();
            Emit(Line("done").Key("state").Value(client.State.ToString()));
            return 0;
        }
        catch (Exception e)
        {
            Emit(Line("crash").Key("error").Value(e.ToString()));
            return 1;
        }
        finally
        {
            relay.Stop();
        }
    }

    static List<object> ModelNames(RealtimeClient client)
    {
        var names = new List<object>();
        foreach (var m in client.Models.Items) names.Add(m["name"].AsString());
        return names;
    }

    /// <summary>The JSON reader and writer on documents Unity's JsonUtility cannot read.</summary>
    static void Json()
    {
        var docs = new List<object>();
        foreach (var text in new[]
        {
            "{\"type\":\"result\",\"outputs\":{\"y\":{\"dtype\":\"float32\",\"shape\":[2],\"data\":[null,1.5e-7]}}}",
            "{\"shape\":[null],\"s\":\"caf\\u00e9 \\\"q\\\" \\n\",\"n\":-0.25,\"big\":9007199254740991,\"t\":true,\"f\":false,\"z\":null}",
            "[1, 2.0, -3e2, {\"a\": []}]",
        })
        {
            docs.Add(JsonValue.Parse(text).ToString());
        }
        var written = new JsonWriter().BeginObject().Key("id").Value(7L).Key("t").Value(0.5).Key("nan").Value(double.NaN)
            .Key("whole").Value(1020.0).Key("s").Value("tab\there").EndObject().ToString();
        string culture = (0.5).ToString();
        Emit(Line("json").Key("reparsed").Value(docs).Key("written").Value(written).Key("culture_writes").Value(culture));
    }

    /// <summary>The client's resampler against the analytic signal: a 1 kHz tone at 48 and
    /// 44.1 kHz, resampled to 16 kHz in odd-sized blocks, is the same tone sampled at 16 kHz
    /// (no gain change, no shift in time).</summary>
    static void Resampler()
    {
        foreach (int rate in new[] { 48000, 44100 })
        {
            var r = new StreamingResampler(rate, 16000);
            var output = new float[16000];
            int produced = 0, fed = 0;
            while (fed < rate)
            {
                int n = Math.Min(937, rate - fed);
                for (int i = 0; i < n; i++) r.Push((float)(0.5 * Math.Sin(2 * Math.PI * 1000.0 * (fed + i) / rate)));
                fed += n;
                produced += r.Pull(output, produced, output.Length - produced);
            }
            r.Flush();
            produced += r.Pull(output, produced, output.Length - produced);
            double worst = 0;
            for (int k = 100; k < produced - 100; k++)  // away from the edges' zero padding
                worst = Math.Max(worst, Math.Abs(output[k] - 0.5 * Math.Sin(2 * Math.PI * 1000.0 * k / 16000)));
            Emit(Line("resampler").Key("from").Value((long)rate).Key("produced").Value((long)produced).Key("max_error").Value(worst));
        }
    }

    static void Codes()
    {
        var codes = new List<object>();
        foreach (var c in ErrorCodes.All) codes.Add(c);
        Emit(Line("codes").Key("codes").Value(codes));
    }

    // --- speech: 48 kHz float stereo in 1024-frame blocks, at real-time pace ----------------

    sealed class Collected
    {
        public readonly List<object> Events = new List<object>();
        public readonly List<long> Seqs = new List<long>();
        public int Errors;
        public bool OffMainThread;
        public Closed Closed;
    }

    static Collected Collect(RealtimeStream s)
    {
        var c = new Collected();
        s.OnResult += r => { c.Seqs.Add(r.Seq); if (Thread.CurrentThread.ManagedThreadId != _mainThread) c.OffMainThread = true; };
        s.OnError += e => { c.Seqs.Add(e.Seq ?? -1); c.Errors++; };
        s.OnEvent += e => c.Events.Add(new Dictionary<string, object> { { "event", e.Name }, { "t", e.T }, { "segment", e.Fields["segment"].AsLong() } });
        s.OnClosed += closed => c.Closed = closed;
        return c;
    }

    static void Speech(RealtimeClient client, string path)
    {
        byte[] raw = File.ReadAllBytes(path);
        var samples = new float[raw.Length / 4];
        Buffer.BlockCopy(raw, 0, samples, 0, raw.Length);
        const int Rate = 48000, Channels = 2, Block = 1024;
        // Two streams from the same audio: resampled here to the model's 16 kHz (a third of the
        // bytes), and sent at 48 kHz for the server to resample.
        var resampled = Wait(client.OpenAsync(new OpenOptions { Model = "speech_activity", DType = DType.Float32, SampleRate = 16000, DeadlineMs = Patient }));
        var native = Wait(client.OpenAsync(new OpenOptions { Model = "speech_activity", DType = DType.Float32, SampleRate = Rate, DeadlineMs = Patient }));
        var got16 = Collect(resampled);
        var got48 = Collect(native);
        var to16 = new AudioSender(resampled, Rate, Channels, 16000);
        var at48 = new AudioSender(native, Rate, Channels, Rate);
        int frames = samples.Length / Channels;
        int blocks = (frames + Block - 1) / Block;
        var pacer = new Pacer();
        double worstLateMs = 0;
        int created = BufferPool.Shared.Created;
        long sendPathGarbage = 0;  // allocated by downmix, resampling, chunking and Send
        int blocksWithoutGarbage = 0;
        for (int b = 0; b < blocks; b++)
        {
            double due = 1000.0 * b * Block / Rate;  // a Stopwatch schedule, not Task.Delay
            pacer.WaitUntil(due);
            worstLateMs = Math.Max(worstLateMs, pacer.ElapsedMs - due);
            int n = Math.Min(Block, frames - b * Block);
            long before = GC.GetAllocatedBytesForCurrentThread(), pooled = BufferPool.Shared.CreatedBytes;
            int newBuffers = BufferPool.Shared.Created;
            to16.Write(samples, b * Block * Channels, n);
            at48.Write(samples, b * Block * Channels, n);
            // What this thread allocated beyond new pool buffers (the pool grows to the peak
            // number of unanswered chunks, then stops).
            if (b >= 50)
            {
                // (an array's own header, up to 64 bytes, comes with each new pool buffer)
                long garbage = GC.GetAllocatedBytesForCurrentThread() - before - (BufferPool.Shared.CreatedBytes - pooled)
                               - 64 * (BufferPool.Shared.Created - newBuffers);
                sendPathGarbage += garbage;
                if (garbage <= 0) blocksWithoutGarbage++;
            }
            client.Pump();
            if (b == 50) created = BufferPool.Shared.Created;  // steady state from here
        }
        to16.Flush();
        at48.Flush();
        int createdInSteadyState = BufferPool.Shared.Created - created;
        Wait(resampled.CloseAsync());
        Wait(native.CloseAsync());
        foreach (var pair in new[] { new KeyValuePair<string, Collected>("resampled_16k", got16), new KeyValuePair<string, Collected>("native_48k", got48) })
        {
            var c = pair.Value;
            Emit(Line("speech").Key("stream").Value(pair.Key).Key("events").Value(c.Events)
                .Key("results").Value((long)c.Seqs.Count).Key("errors").Value((long)c.Errors).Key("in_order").Value(InOrder(c.Seqs))
                .Key("closed_results").Value(c.Closed != null ? c.Closed.Results : -1).Key("off_main_thread").Value(c.OffMainThread));
        }
        Emit(Line("pacing").Key("blocks").Value((long)blocks).Key("duration_ms").Value(pacer.ElapsedMs)
            .Key("worst_late_ms").Value(worstLateMs).Key("buffers_created_in_steady_state").Value((long)createdInSteadyState)
            .Key("send_path_garbage_bytes").Value(sendPathGarbage).Key("chunks_measured").Value(2L * (blocks - 50))
            .Key("blocks_measured").Value((long)(blocks - 50)).Key("blocks_without_garbage").Value((long)blocksWithoutGarbage));
    }

    static bool InOrder(List<long> seqs)
    {
        for (int i = 0; i < seqs.Count; i++) if (seqs[i] != i) return false;
        return true;
    }

    // --- pose: JSON and binary results -----------------------------------------------------

    const int PoseFrames = 40;

    /// <summary>Head and hands moving at constant velocity, turning slowly: [3, 7] per frame.</summary>
    static float[] PoseFrame(int k)
    {
        var p = new float[21];
        for (int d = 0; d < 3; d++)
        {
            p[d * 7 + 0] = 0.01f * k + d;              // x moves 1 cm a frame
            p[d * 7 + 1] = 1.6f - 0.4f * d;
            p[d * 7 + 2] = -0.005f * k;
            double half = 0.01 * k / 2;                 // yaw 0.01 rad a frame
            p[d * 7 + 3] = 0f;
            p[d * 7 + 4] = (float)Math.Sin(half);
            p[d * 7 + 5] = 0f;
            p[d * 7 + 6] = (float)Math.Cos(half);
        }
        return p;
    }

    static readonly int[] PoseShape = { 3, 7 };

    sealed class PoseAnswers
    {
        public readonly Dictionary<long, double[]> Predicted = new Dictionary<long, double[]>();
        public readonly List<long> Seqs = new List<long>();
        public readonly List<string> Errors = new List<string>();
        public bool OffMainThread;
    }

    static PoseAnswers Listen(RealtimeStream s)
    {
        var a = new PoseAnswers();
        s.OnResult += r =>
        {
            lock (a)
            {
                a.Seqs.Add(r.Seq);
                a.Predicted[r.Seq] = r.Outputs["predicted"].Data;
                if (Thread.CurrentThread.ManagedThreadId != _mainThread) a.OffMainThread = true;
            }
        };
        s.OnError += e => { lock (a) { a.Seqs.Add(e.Seq ?? -1); a.Errors.Add(e.WireCode); } };
        return a;
    }

    static int Count(PoseAnswers a) { lock (a) return a.Seqs.Count; }

    static double MaxDiff(PoseAnswers a, PoseAnswers b)
    {
        double worst = 0;
        for (long k = 0; k < PoseFrames; k++)
        {
            double[] x, y;
            if (!a.Predicted.TryGetValue(k, out x) || !b.Predicted.TryGetValue(k, out y)) return double.PositiveInfinity;
            for (int i = 0; i < x.Length; i++) worst = Math.Max(worst, Math.Abs(x[i] - y[i]));
        }
        return worst;
    }

    static PoseAnswers Pose(RealtimeClient client, string directUrl)
    {
        // JSON results on this client (main-thread callbacks); binary results on a second client
        // whose callbacks run on the receiving thread.
        var json = Wait(client.OpenAsync(new OpenOptions { Model = "pose", Shape = PoseShape, DeadlineMs = Patient }));
        var worker = Wait(RealtimeClient.ConnectAsync(directUrl, new RealtimeClientOptions { Callbacks = CallbackThread.Worker }));
        var binary = Wait(worker.OpenAsync(new OpenOptions { Model = "pose", Shape = PoseShape, Results = ResultMode.Binary, DeadlineMs = Patient }));
        var a = Listen(json);
        var b = Listen(binary);
        for (int k = 0; k < PoseFrames; k++)
        {
            var frame = PoseFrame(k);
            json.Send(frame, 0, frame.Length, k * 12.5, PoseShape);
            binary.Send(frame, 0, frame.Length, k * 12.5, PoseShape);
        }
        PumpUntil(() => Count(a) == PoseFrames && Count(b) == PoseFrames);
        if (a.Errors.Count + b.Errors.Count > 0)
        {
            Emit(Line("pose").Key("errors").Value((long)(a.Errors.Count + b.Errors.Count)).Key("codes").Value(new List<object>(a.Errors)));
            return a;
        }
        var first = PoseFrame(0);
        double firstDiff = 0;
        for (int i = 0; i < 21; i++) firstDiff = Math.Max(firstDiff, Math.Abs(a.Predicted[0][i] - first[i]));
        // Constant velocity: once converged, "predicted" is 2 frames ahead of the last frame.
        var ahead = PoseFrame(PoseFrames - 1 + 2);
        double aheadDiff = 0;
        for (int d = 0; d < 3; d++)
            for (int i = 0; i < 3; i++) aheadDiff = Math.Max(aheadDiff, Math.Abs(a.Predicted[PoseFrames - 1][d * 7 + i] - ahead[d * 7 + i]));
        Emit(Line("pose").Key("json_results").Value((long)Count(a)).Key("binary_results").Value((long)Count(b))
            .Key("json_in_order").Value(InOrder(a.Seqs)).Key("binary_in_order").Value(InOrder(b.Seqs))
            .Key("errors").Value((long)(a.Errors.Count + b.Errors.Count))
            .Key("json_vs_binary_max_diff").Value(MaxDiff(a, b))
            .Key("first_frame_passthrough_diff").Value(firstDiff).Key("prediction_2_ahead_diff_m").Value(aheadDiff)
            .Key("json_off_main_thread").Value(a.OffMainThread).Key("binary_off_main_thread").Value(b.OffMainThread)
            .Key("output_names").Value(new List<object>(json.Opened.OutputNames)));
        Wait(json.CloseAsync());
        worker.Close();
        return a;
    }

    // --- resume: cut the connection mid-stream ---------------------------------------------

    static void Resume(RealtimeClient client, Relay relay, PoseAnswers reference)
    {
        var states = new List<object>();
        client.OnStateChanged += s => states.Add(s.ToString());
        var s1 = Wait(client.OpenAsync(new OpenOptions { Model = "pose", Shape = PoseShape, DeadlineMs = Patient }));
        var got = Listen(s1);
        for (int k = 0; k < 20; k++)
        {
            var frame = PoseFrame(k);
            s1.Send(frame, 0, frame.Length, k * 12.5, PoseShape);
        }
        PumpUntil(() => Count(got) >= 5);
        int before = Count(got);
        int cut = relay.CutAll();  // both sockets dropped, no close frame: a lost network
        for (int k = 20; k < PoseFrames; k++)
        {
            var frame = PoseFrame(k);
            s1.Send(frame, 0, frame.Length, k * 12.5, PoseShape);  // kept while resuming, sent after
        }
        PumpUntil(() => Count(got) >= PoseFrames);
        var closed = Wait(s1.CloseAsync());
        client.Pump();
        Emit(Line("resume").Key("answered_before_cut").Value((long)before).Key("connections_cut").Value((long)cut)
            .Key("resumes").Value((long)client.Resumes).Key("seqs").Value(got.Seqs).Key("errors").Value(got.Errors)
            .Key("max_diff_vs_uncut").Value(MaxDiff(got, reference)).Key("states").Value(states)
            .Key("closed_results").Value(closed.Results).Key("closed_errors").Value(closed.Errors));
    }

    // --- a restart that hands the session to the next server process ------------------------

    /// <summary>The test sends SIGTERM to a server started with --resume-dir once this prints
    /// "handoff_ready", then starts the next process on the same port: the client follows the
    /// going_away's resume token and resumes there by itself.</summary>
    static int Handoff(string url)
    {
        try
        {
            var client = Wait(RealtimeClient.ConnectAsync(url));
            Pumped.Add(client);
            var states = new List<object>();
            client.OnStateChanged += st => states.Add(st.ToString());
            var s = Wait(client.OpenAsync(new OpenOptions { Model = "pose", Shape = PoseShape, DeadlineMs = Patient }));
            var got = Listen(s);
            for (int k = 0; k < 20; k++)
            {
                var frame = PoseFrame(k);
                s.Send(frame, 0, frame.Length, k * 12.5, PoseShape);
            }
            PumpUntil(() => Count(got) >= 10);
            Emit(Line("handoff_ready"));
            PumpUntil(() => client.GoingAway != null, 60000);
            for (int k = 20; k < PoseFrames; k++)
            {
                var frame = PoseFrame(k);
                s.Send(frame, 0, frame.Length, k * 12.5, PoseShape);  // held until the session moved
            }
            PumpUntil(() => Count(got) >= PoseFrames, 60000);
            // The filter went on as if nothing happened: the same outputs as an uncut stream.
            var again = Wait(client.OpenAsync(new OpenOptions { Model = "pose", Shape = PoseShape, DeadlineMs = Patient }));
            var reference = Listen(again);
            for (int k = 0; k < PoseFrames; k++)
            {
                var frame = PoseFrame(k);
                again.Send(frame, 0, frame.Length, k * 12.5, PoseShape);
            }
            PumpUntil(() => Count(reference) >= PoseFrames);
            Emit(Line("handoff").Key("had_token").Value(client.GoingAway["resume_token"].IsString)
                .Key("resumes").Value((long)client.Resumes).Key("seqs").Value(got.Seqs).Key("errors").Value(got.Errors)
                .Key("max_diff_vs_uncut").Value(MaxDiff(got, reference)).Key("states").Value(states));
            client.Close();
            Emit(Line("done").Key("state").Value(client.State.ToString()));
            return 0;
        }
        catch (Exception e)
        {
            Emit(Line("crash").Key("error").Value(e.ToString()));
            return 1;
        }
    }

    // --- typed errors ------------------------------------------------------------------------

    static void BadOpens(RealtimeClient client)
    {
        var cases = new List<KeyValuePair<string, OpenOptions>>
        {
            new KeyValuePair<string, OpenOptions>("unknown_model", new OpenOptions { Model = "no_such_model", Kind = StreamKind.Tensor, DType = DType.Float32 }),
            new KeyValuePair<string, OpenOptions>("unknown_version", new OpenOptions { Model = "pose", Version = "999" }),
            new KeyValuePair<string, OpenOptions>("kind_mismatch", new OpenOptions { Model = "pose", Kind = StreamKind.Audio }),
            new KeyValuePair<string, OpenOptions>("dtype_mismatch", new OpenOptions { Model = "pose", DType = DType.Int16 }),
            new KeyValuePair<string, OpenOptions>("shape_mismatch", new OpenOptions { Model = "pose", Shape = new[] { 4, 7 } }),
            new KeyValuePair<string, OpenOptions>("unsupported_sample_rate", new OpenOptions { Model = "speech_activity", SampleRate = 500 }),
        };
        foreach (var c in cases)
        {
            string code = "none", enumName = "none", type = "none";
            bool retryable = true;
            try
            {
                Wait(client.OpenAsync(c.Value));
            }
            catch (RealtimeException e)
            {
                code = e.WireCode;
                enumName = e.Code.ToString();
                type = e.GetType().Name;
                retryable = e.Retryable;
            }
            Emit(Line("bad_open").Key("case").Value(c.Key).Key("code").Value(code).Key("enum").Value(enumName)
                .Key("type").Value(type).Key("retryable").Value(retryable));
        }
        // A bad chunk is answered with a typed error in its place; the stream goes on.
        var s = Wait(client.OpenAsync(new OpenOptions { Model = "pose", DeadlineMs = Patient }));
        var got = Listen(s);
        var frame = PoseFrame(0);
        s.Send(frame, 0, 14, 0, new[] { 2, 7 });
        s.Send(frame, 0, 21, 12.5, PoseShape);
        PumpUntil(() => Count(got) == 2);
        Emit(Line("bad_chunk").Key("errors").Value(got.Errors).Key("seqs").Value(got.Seqs)
            .Key("results").Value((long)got.Predicted.Count));
        Wait(s.CloseAsync());
    }

    /// <summary>A loopback TCP relay to the server that can drop every connection at once.</summary>
    sealed class Relay
    {
        readonly TcpListener _listener = new TcpListener(IPAddress.Loopback, 0);
        readonly int _target;
        readonly List<TcpClient> _open = new List<TcpClient>();
        public readonly int Port;

        public Relay(int target)
        {
            _target = target;
            _listener.Start();
            Port = ((IPEndPoint)_listener.LocalEndpoint).Port;
            Task.Run(Accept);
        }

        async Task Accept()
        {
            while (true)
            {
                TcpClient inbound;
                try { inbound = await _listener.AcceptTcpClientAsync().ConfigureAwait(false); }
                catch (Exception) { return; }
                var outbound = new TcpClient();
                try { await outbound.ConnectAsync(IPAddress.Loopback, _target).ConfigureAwait(false); }
                catch (Exception) { inbound.Close(); continue; }
                inbound.NoDelay = outbound.NoDelay = true;
                lock (_open) { _open.Add(inbound); _open.Add(outbound); }
                Pipe(inbound, outbound);
                Pipe(outbound, inbound);
            }
        }

        static async void Pipe(TcpClient from, TcpClient to)
        {
            var buf = new byte[65536];
            try
            {
                var src = from.GetStream();
                var dst = to.GetStream();
                while (true)
                {
                    int n = await src.ReadAsync(buf, 0, buf.Length).ConfigureAwait(false);
                    if (n == 0) break;
                    await dst.WriteAsync(buf, 0, n).ConfigureAwait(false);
                }
            }
            catch (Exception) { }
            try { to.Close(); } catch (Exception) { }
            try { from.Close(); } catch (Exception) { }
        }

        /// <summary>Drop every relayed connection (reset, no WebSocket close); returns how many pairs.</summary>
        public int CutAll()
        {
            lock (_open)
            {
                foreach (var c in _open)
                {
                    try { c.Client.LingerState = new LingerOption(true, 0); c.Close(); } catch (Exception) { }
                }
                int pairs = _open.Count / 2;
                _open.Clear();
                return pairs;
            }
        }

        public void Stop()
        {
            _listener.Stop();
            CutAll();
        }
    }
}
