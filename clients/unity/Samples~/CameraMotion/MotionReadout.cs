// Sample: a camera's RenderTexture streamed to the built-in `motion` model (96 x 96 RGB).
using Realtime;
using Realtime.Unity;
using UnityEngine;

/// <summary>Shows how much of the picture moved, and where, from each `motion` result.</summary>
public sealed class MotionReadout : MonoBehaviour
{
    public FrameStreamer frames;
    [Tooltip("Optional: an object spun so that the picture moves")]
    public Transform spin;

    string _text = "waiting for frames";
    bool _subscribed;

    void Start()
    {
        // The streamed camera renders into its own small texture, not to the screen.
        var cam = frames.sourceCamera;
        if (cam != null && cam.targetTexture == null) cam.targetTexture = new RenderTexture(320, 240, 16, RenderTextureFormat.ARGB32);
    }

    void Update()
    {
        if (spin != null) spin.rotation = Quaternion.Euler(0, 90 * Time.time, 20);
        if (_subscribed || frames.Stream == null) return;
        _subscribed = true;
        frames.Stream.OnResult += r =>
        {
            double motion = r.Outputs["motion"].Data[0];
            var xy = r.Outputs["motion_xy"].Data;
            _text = "motion " + (100 * motion).ToString("0.0") + "% at (" + xy[0].ToString("0.00") + ", " + xy[1].ToString("0.00")
                    + ")  round trip " + (r.QueueMs + r.InferMs).ToString("0.0") + " ms server-side, skipped " + frames.Skipped;
        };
    }

    void OnGUI()
    {
        GUI.Label(new Rect(20, 20, 600, 40), _text);
    }
}
