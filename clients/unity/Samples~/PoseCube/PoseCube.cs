// Sample: head pose streamed to the built-in `pose` model; a cube follows the predicted pose.
using Realtime.Unity;
using UnityEngine;

/// <summary>Moves this object to the predicted head pose. Without a headset, set
/// <c>demoHead</c>: it is moved in a circle and streamed in the head's place.</summary>
public sealed class PoseCube : MonoBehaviour
{
    public XRPoseStreamer poses;
    [Tooltip("Optional: a stand-in head moved in a circle (no headset needed)")]
    public Transform demoHead;
    public float radius = 0.5f;

    float _angle;

    void Update()
    {
        if (demoHead != null)
        {
            _angle += Time.deltaTime;
            demoHead.position = new Vector3(radius * Mathf.Cos(_angle), 1.6f, radius * Mathf.Sin(_angle));
        }
        if (poses.Stream == null) return;
        var head = poses.Predicted(0);  // 0 head, 1 left hand, 2 right hand
        transform.SetPositionAndRotation(head.position, head.rotation);
    }
}
