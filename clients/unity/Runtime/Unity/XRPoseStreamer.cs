// XR pose capture to the built-in `pose` model: head, left and right hand as [3, 7] float32
// (position x y z, quaternion x y z w), one chunk per frame; the predicted poses come back.
using System;
using UnityEngine;
using UnityEngine.XR;

namespace Realtime.Unity
{
    /// <summary>Rows of the pose model's input: 0 head, 1 left hand, 2 right hand.</summary>
    public static class PoseLayout
    {
        public const int Devices = 3;
        public const int Values = 7;
        public static readonly int[] Shape = { Devices, Values };

        /// <summary>Write one device's pose into its row of a [3, 7] buffer.</summary>
        public static void Write(float[] dst, int device, Vector3 position, Quaternion rotation)
        {
            int o = device * Values;
            dst[o] = position.x; dst[o + 1] = position.y; dst[o + 2] = position.z;
            dst[o + 3] = rotation.x; dst[o + 4] = rotation.y; dst[o + 5] = rotation.z; dst[o + 6] = rotation.w;
        }

        /// <summary>Read one device's row of a result output ([3, 7]).</summary>
        public static Pose Read(Tensor t, int device)
        {
            int o = device * Values;
            var d = t.Data;
            return new Pose(new Vector3((float)d[o], (float)d[o + 1], (float)d[o + 2]),
                            new Quaternion((float)d[o + 3], (float)d[o + 4], (float)d[o + 5], (float)d[o + 6]));
        }
    }

    /// <summary>Sends the XR rig's head and hand poses to the <c>pose</c> model every frame (or
    /// from Transforms, for a rig without XR input or in the editor) and keeps the latest
    /// <c>predicted</c> poses. A frame is skipped while <c>maxInFlight</c> are unanswered, so a
    /// slow link never builds a queue.</summary>
    public sealed class XRPoseStreamer : MonoBehaviour
    {
        public RealtimeConnection connection;
        public string model = "pose";
        [Tooltip("Optional: read these instead of the XR input devices")]
        public Transform head, leftHand, rightHand;
        public int maxInFlight = 2;

        static readonly XRNode[] Nodes = { XRNode.Head, XRNode.LeftHand, XRNode.RightHand };
        readonly float[] _frame = new float[PoseLayout.Devices * PoseLayout.Values];
        readonly Pose[] _predicted = new Pose[PoseLayout.Devices];
        readonly Pose[] _smoothed = new Pose[PoseLayout.Devices];

        public RealtimeStream Stream { get; private set; }
        /// <summary>Frames skipped because the previous ones were not answered yet.</summary>
        public int Skipped { get; private set; }
        /// <summary>Raised with each result (main thread).</summary>
        public event Action<Result> OnPrediction;

        /// <summary>The latest predicted pose of a device (0 head, 1 left hand, 2 right hand).</summary>
        public Pose Predicted(int device) { return _predicted[device]; }
        /// <summary>The latest smoothed pose of a device.</summary>
        public Pose Smoothed(int device) { return _smoothed[device]; }

        async void Start()
        {
            var client = await connection.Connected;
            Stream = await client.OpenAsync(new OpenOptions { Model = model, Shape = PoseLayout.Shape });
            Stream.OnResult += r =>
            {
                Tensor predicted, smoothed;
                for (int d = 0; d < PoseLayout.Devices; d++)
                {
                    if (r.Outputs.TryGetValue("predicted", out predicted)) _predicted[d] = PoseLayout.Read(predicted, d);
                    if (r.Outputs.TryGetValue("smoothed", out smoothed)) _smoothed[d] = PoseLayout.Read(smoothed, d);
                }
                var h = OnPrediction;
                if (h != null) h(r);
            };
        }

        void Update()
        {
            if (Stream == null) return;
            if (Stream.InFlight >= maxInFlight)
            {
                Skipped++;
                return;
            }
            for (int d = 0; d < PoseLayout.Devices; d++)
            {
                Vector3 p = Vector3.zero;
                Quaternion q = Quaternion.identity;
                var source = d == 0 ? head : d == 1 ? leftHand : rightHand;
                if (source != null)
                {
                    p = source.position;
                    q = source.rotation;
                }
                else
                {
                    var dev = InputDevices.GetDeviceAtXRNode(Nodes[d]);
                    if (dev.isValid)
                    {
                        dev.TryGetFeatureValue(CommonUsages.devicePosition, out p);
                        dev.TryGetFeatureValue(CommonUsages.deviceRotation, out q);
                    }
                }
                PoseLayout.Write(_frame, d, p, q);
            }
            Stream.Send(_frame, 0, _frame.Length, RealtimeClock.NowMs(), PoseLayout.Shape);
        }
    }
}
