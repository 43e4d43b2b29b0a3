// Microphone capture to an audio stream: Unity's Microphone API, downmixed and resampled to the
// model's rate (16 kHz for speech_activity), sent in fixed chunks timestamped by samples.
using System;
using UnityEngine;

namespace Realtime.Unity
{
    /// <summary>Streams the microphone to an audio model in <c>chunkMs</c> chunks of mono float32
    /// at the model's rate. Reads what the microphone recorded each Update, in fixed blocks into
    /// reused buffers (no garbage per frame); the chunks' <c>t</c> is the time of their first
    /// sample since capture started, so events line up with the audio, not with frame times.
    /// Not available in WebGL builds (Unity has no Microphone there).</summary>
    public sealed class MicrophoneStreamer : MonoBehaviour
    {
        public RealtimeConnection connection;
        public string model = "speech_activity";
        [Tooltip("Microphone device name; empty: the default one")]
        public string device = "";
        [Tooltip("Rate asked of the microphone (the device may give another; it is resampled)")]
        public int captureRate = 48000;
        [Tooltip("Chunk length sent to the server")]
        public int chunkMs = 20;

        const int Block = 256;  // frames read from the clip at a time
        AudioClip _clip;
        AudioSender _sender;
        float[] _block;
        int _readFrame;
        bool _started;

        /// <summary>The stream, once open (subscribe to its OnEvent / OnResult).</summary>
        public RealtimeStream Stream { get; private set; }
        /// <summary>Raised once the stream is open.</summary>
        public event Action<RealtimeStream> Opened;

        async void Start()
        {
            var client = await connection.Connected;
            var entry = client.Model(model);
            int rate = entry != null ? entry["input"]["sample_rate"].AsInt(16000) : 16000;
            string name = string.IsNullOrEmpty(device) ? null : device;
            _clip = Microphone.Start(name, true, 1, captureRate);
            if (_clip == null)
            {
                Debug.LogError("realtime: no microphone");
                return;
            }
            Stream = await client.OpenAsync(new OpenOptions { Model = model, DType = DType.Float32, SampleRate = rate });
            _sender = new AudioSender(Stream, _clip.frequency, _clip.channels, rate, rate * chunkMs / 1000);
            _block = new float[Block * _clip.channels];
            _readFrame = Microphone.GetPosition(name);
            _started = true;
            var opened = Opened;
            if (opened != null) opened(Stream);
        }

        void Update()
        {
            if (!_started) return;
            string name = string.IsNullOrEmpty(device) ? null : device;
            int written = Microphone.GetPosition(name);
            int available = written - _readFrame;
            if (available < 0) available += _clip.samples;  // the clip loops
            while (available >= Block)
            {
                _clip.GetData(_block, _readFrame);  // wraps around the loop end
                _sender.Write(_block, 0, Block);
                _readFrame = (_readFrame + Block) % _clip.samples;
                available -= Block;
            }
        }

        void OnDestroy()
        {
            if (!_started) return;
            Microphone.End(string.IsNullOrEmpty(device) ? null : device);
            _started = false;
            try
            {
                _sender.Flush(true);  // the server closes an open utterance now
            }
            catch (RealtimeDisconnectedException)
            {
                // the connection was closed first (scene unload): nothing left to tell
            }
        }
    }
}
