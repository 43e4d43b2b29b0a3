// A scene component that owns one RealtimeClient: connects on Start, pumps its callbacks on the
// main thread in Update, closes it when destroyed. Helpers and samples find their client here.
using System;
using System.Threading.Tasks;
using UnityEngine;

namespace Realtime.Unity
{
    /// <summary>Connects to a realtime server and delivers results, events and errors on Unity's
    /// main thread (it calls <see cref="RealtimeClient.Pump"/> every Update).</summary>
    public sealed class RealtimeConnection : MonoBehaviour
    {
        [Tooltip("ws:// or wss:// address of the realtime server")]
        public string url = "ws://127.0.0.1:8765/";
        [Tooltip("A session token minted by your backend (works in WebGL builds too)")]
        public string token = "";
        [Tooltip("Sent in hello.client")]
        public string clientName = "unity";

        readonly TaskCompletionSource<RealtimeClient> _connected = new TaskCompletionSource<RealtimeClient>();

        /// <summary>The client, once connected (null before).</summary>
        public RealtimeClient Client { get; private set; }

        /// <summary>Completes with the client once welcomed (or fails with the reason).</summary>
        public Task<RealtimeClient> Connected { get { return _connected.Task; } }

        async void Start()
        {
            var options = new RealtimeClientOptions
            {
                ClientName = clientName,
                Token = string.IsNullOrEmpty(token) ? null : token,
                Callbacks = CallbackThread.MainThread,
                OnCallbackException = Debug.LogException,
                Transports = DefaultTransports(),
            };
            try
            {
                Client = await RealtimeClient.ConnectAsync(url, options);
                Client.OnError += e => Debug.LogWarning("realtime: " + e.Message);
                Client.OnDisconnected += e => Debug.LogWarning("realtime: " + e.Message);
                _connected.TrySetResult(Client);
            }
            catch (Exception e)
            {
                Debug.LogError("realtime: cannot connect to " + url + ": " + e.Message);
                _connected.TrySetException(e);
            }
        }

        /// <summary>The browser's WebSocket in WebGL builds, ClientWebSocket everywhere else.</summary>
        public static ITransportFactory DefaultTransports()
        {
#if UNITY_WEBGL && !UNITY_EDITOR
            return new WebGLTransportFactory();
#else
            return new ClientWebSocketFactory();
#endif
        }

        void Update()
        {
            if (Client != null) Client.Pump();
        }

        void OnDestroy()
        {
            if (Client != null) Client.Close();
        }
    }
}
