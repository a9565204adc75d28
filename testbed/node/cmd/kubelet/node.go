package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

const (
	// leaseDuration is the Node Lease's length in seconds (the real kubelet's).
	leaseDuration = 40
	// leaseRenewInterval is how often the Lease is renewed (a quarter of it,
	// like the real kubelet), so the node-lifecycle controller never marks
	// the Node unknown.
	leaseRenewInterval = 10 * time.Second
	// nodeStatusInterval is how often the Ready condition's heartbeat is
	// refreshed.
	nodeStatusInterval = time.Minute
	// kubeletVersion is what the Node reports: the version of the control
	// plane the bed is built from.
	kubeletVersion = "v1.35.4"
)

// readyFile names the file written once the Node is Ready and schedulable;
// scripts/testbed waits for it.
func (k *kubelet) readyFile() string { return filepath.Join(k.cfg.dir, "node-ready") }

// registerNode creates (or takes over) the Node, marks it Ready, lifts the
// not-ready taints the admission plugin puts on new Nodes, and writes the
// ready file.
func (k *kubelet) registerNode(ctx context.Context) error {
	nodes := k.client.CoreV1().Nodes()
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		node, err := nodes.Get(ctx, k.cfg.nodeName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			node, err = nodes.Create(ctx, k.newNode(), metav1.CreateOptions{})
		}
		if err != nil {
			klog.Warningf("registering node %s: %v (retrying)", k.cfg.nodeName, err)
			return false, nil
		}
		k.nodeUID = node.UID
		if err := k.untaint(ctx, node); err != nil {
			klog.Warningf("removing not-ready taints from node %s: %v (retrying)", k.cfg.nodeName, err)
			return false, nil
		}
		if err := k.updateNodeStatus(ctx); err != nil {
			klog.Warningf("marking node %s ready: %v (retrying)", k.cfg.nodeName, err)
			return false, nil
		}
		if err := k.renewLease(ctx); err != nil {
			klog.Warningf("creating the lease of node %s: %v (retrying)", k.cfg.nodeName, err)
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("node %s never registered: %w", k.cfg.nodeName, err)
	}
	return nil
}

// markReady writes the ready file once pods can be run.
func (k *kubelet) markReady() error {
	stamp := []byte(time.Now().UTC().Format(time.RFC3339Nano) + "\n")
	return os.WriteFile(k.readyFile(), stamp, 0o644)
}

// newNode describes this machine as a Node.
func (k *kubelet) newNode() *corev1.Node {
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("16"),
		corev1.ResourceMemory:           resource.MustParse("64Gi"),
		corev1.ResourcePods:             resource.MustParse("110"),
		corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: k.cfg.nodeName,
			Labels: map[string]string{
				"kubernetes.io/hostname": k.cfg.nodeName,
				"kubernetes.io/os":       "linux",
				"kubernetes.io/arch":     "amd64",
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: k.cfg.podNet.String(), PodCIDRs: []string{k.cfg.podNet.String()}},
		Status: corev1.NodeStatus{
			Capacity:    capacity,
			Allocatable: capacity,
		},
	}
}

// untaint removes the taints that only the node-lifecycle controller would
// lift, so pods schedule whether or not it runs.
func (k *kubelet) untaint(ctx context.Context, node *corev1.Node) error {
	var keep []corev1.Taint
	for _, t := range node.Spec.Taints {
		if t.Key == corev1.TaintNodeNotReady || t.Key == corev1.TaintNodeUnreachable {
			continue
		}
		keep = append(keep, t)
	}
	if len(keep) == len(node.Spec.Taints) {
		return nil
	}
	node = node.DeepCopy()
	node.Spec.Taints = keep
	_, err := k.client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{})
	return err
}

// updateNodeStatus reports the Node Ready with a fresh heartbeat.
func (k *kubelet) updateNodeStatus(ctx context.Context) error {
	nodes := k.client.CoreV1().Nodes()
	node, err := nodes.Get(ctx, k.cfg.nodeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	now := metav1.Now()
	node = node.DeepCopy()
	fresh := k.newNode().Status
	node.Status.Capacity = fresh.Capacity
	node.Status.Allocatable = fresh.Allocatable
	node.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: k.cfg.bridgeIP.String()},
		{Type: corev1.NodeHostName, Address: k.cfg.nodeName},
	}
	node.Status.NodeInfo = corev1.NodeSystemInfo{
		KubeletVersion:          kubeletVersion,
		OperatingSystem:         "linux",
		Architecture:            "amd64",
		ContainerRuntimeVersion: "testbed://processes",
		OSImage:                 "raft-elector test bed",
	}
	node.Status.Phase = corev1.NodeRunning
	conditions := []corev1.NodeCondition{
		{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", Message: "test bed kubelet is posting ready status"},
		{Type: corev1.NodeMemoryPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientMemory"},
		{Type: corev1.NodeDiskPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasNoDiskPressure"},
		{Type: corev1.NodePIDPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientPID"},
		{Type: corev1.NodeNetworkUnavailable, Status: corev1.ConditionFalse, Reason: "BridgeUp"},
	}
	for i := range conditions {
		c := &conditions[i]
		c.LastHeartbeatTime = now
		c.LastTransitionTime = now
		for _, old := range node.Status.Conditions {
			if old.Type == c.Type && old.Status == c.Status {
				c.LastTransitionTime = old.LastTransitionTime
			}
		}
	}
	node.Status.Conditions = conditions
	_, err = nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}

// renewLease creates or renews the Node's Lease in kube-node-lease.
func (k *kubelet) renewLease(ctx context.Context) error {
	leases := k.client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, k.cfg.nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name:      k.cfg.nodeName,
				Namespace: corev1.NamespaceNodeLease,
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Node", Name: k.cfg.nodeName, UID: k.nodeUID,
				}},
			},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(k.cfg.nodeName),
				LeaseDurationSeconds: ptr.To[int32](leaseDuration),
				RenewTime:            &now,
			},
		}, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	lease = lease.DeepCopy()
	lease.Spec.HolderIdentity = ptr.To(k.cfg.nodeName)
	lease.Spec.LeaseDurationSeconds = ptr.To[int32](leaseDuration)
	lease.Spec.RenewTime = &now
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return err
}

// heartbeat renews the Lease and the Ready condition until ctx ends.
func (k *kubelet) heartbeat(ctx context.Context) {
	leaseTick := time.NewTicker(leaseRenewInterval)
	statusTick := time.NewTicker(nodeStatusInterval)
	defer leaseTick.Stop()
	defer statusTick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-leaseTick.C:
			if err := k.renewLease(ctx); err != nil && ctx.Err() == nil {
				klog.Warningf("renewing the node lease: %v", err)
			}
		case <-statusTick.C:
			if err := k.updateNodeStatus(ctx); err != nil && ctx.Err() == nil {
				klog.Warningf("updating node status: %v", err)
			}
		}
	}
}
