// Camera / RenderTexture frames to a video stream: downscaled on the GPU to the model's input
// size, read back as RGB24 and sent as uint8 [height, width, 3], top row first.
using System;
using Unity.Collections;
using UnityEngine;
using UnityEngine.Rendering;

namespace Realtime.Unity
{
    /// <summary>Sends a RenderTexture (or a camera's target) to a video model at <c>fps</c>,
    /// downscaled to the model's [h, w, 3] (from the catalog, e.g. 96 x 96 for <c>motion</c>).
    /// Reads back with AsyncGPUReadback where the platform has it (no stall), else ReadPixels
    /// (WebGL). A frame is skipped while the previous one is unanswered. Frame buffers are pooled.</summary>
    public sealed class FrameStreamer : MonoBehaviour
    {
        public RealtimeConnection connection;
        public string model = "motion";
        [Tooltip("What to send; if empty, the camera's targetTexture")]
        public RenderTexture source;
        public Camera sourceCamera;
        public float fps = 15;

        RenderTexture _small;
        Texture2D _readable;
        byte[] _rgb;
        int[] _shape;
        int _width, _height;
        double _next;
        bool _reading;

        public RealtimeStream Stream { get; private set; }
        /// <summary>Frames skipped because the previous one had no answer yet.</summary>
        public int Skipped { get; private set; }

        async void Start()
        {
            var client = await connection.Connected;
            var shape = client.Model(model)["input"]["shape"];
            _height = shape[0].AsInt(96);
            _width = shape[1].AsInt(96);
            _shape = new[] { _height, _width, 3 };
            _rgb = new byte[_height * _width * 3];
            _small = new RenderTexture(_width, _height, 0, RenderTextureFormat.ARGB32);
            _readable = new Texture2D(_width, _height, TextureFormat.RGB24, false);
            Stream = await client.OpenAsync(new OpenOptions { Model = model, DType = DType.UInt8, Shape = _shape });
        }

        void Update()
        {
            if (Stream == null || _reading) return;
            double now = RealtimeClock.NowMs();
            if (now < _next) return;
            _next = now + 1000.0 / fps;
            if (Stream.InFlight > 0)
            {
                Skipped++;
                return;
            }
            var src = source != null ? source : sourceCamera != null ? sourceCamera.targetTexture : null;
            if (src == null) return;
            Graphics.Blit(src, _small);  // downscale on the GPU
            if (SystemInfo.supportsAsyncGPUReadback)
            {
                _reading = true;
                AsyncGPUReadback.Request(_small, 0, TextureFormat.RGB24, OnReadback);
            }
            else
            {
                var active = RenderTexture.active;
                RenderTexture.active = _small;
                _readable.ReadPixels(new Rect(0, 0, _width, _height), 0, 0, false);
                RenderTexture.active = active;
                Send(_readable.GetRawTextureData<byte>());
            }
        }

        void OnReadback(AsyncGPUReadbackRequest request)
        {
            _reading = false;
            if (request.hasError || Stream == null) return;
            Send(request.GetData<byte>());
        }

        /// <summary>Copy rows bottom-up (Unity's texture order) into top-down [h, w, 3] and send.</summary>
        void Send(NativeArray<byte> data)
        {
            int row = _width * 3;
            if (data.Length < row * _height) return;
            for (int y = 0; y < _height; y++) NativeArray<byte>.Copy(data, (_height - 1 - y) * row, _rgb, y * row, row);
            Stream.Send(_rgb, 0, _rgb.Length, RealtimeClock.NowMs(), _shape);
        }

        void OnDestroy()
        {
            if (_small != null) _small.Release();
        }
    }
}
