package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

const (
	// shutdownGrace caps the grace period pods get when the kubelet itself
	// stops (scripts/testbed down), so tearing the bed down stays quick.
	shutdownGrace = 2 * time.Second
	// sandboxRetry is the wait between attempts to set a pod up.
	sandboxRetry = 500 * time.Millisecond
	// apiTimeout bounds one status PATCH or final DELETE.
	apiTimeout = 10 * time.Second
)

// podWorker runs one pod (one UID) from sandbox to teardown.
type podWorker struct {
	k                    *kubelet
	uid                  types.UID
	namespace, name, key string
	netns, veth, dir     string

	// mu guards everything below.
	mu           sync.Mutex
	pod          *corev1.Pod
	ip           net.IP
	startTime    metav1.Time
	sandboxReady bool
	initialized  bool
	initFailed   bool
	message      string
	inits        []*container
	containers   []*container
	// gone means the API object no longer exists: no more patches.
	gone bool
	// deleteRequested means the pod has a deletionTimestamp: finalize it
	// once its processes end.
	deleteRequested bool
	// deadline is when the grace period of a stopping pod ends.
	deadline time.Time

	stopOnce sync.Once
	// stopping is closed when the pod must stop (deleted, or kubelet exit).
	stopping chan struct{}
	// dirty (capacity 1) asks the status loop for a PATCH.
	dirty chan struct{}
	// patchMu orders status PATCHes (each is built when it is sent).
	patchMu sync.Mutex
}

func newPodWorker(k *kubelet, pod *corev1.Pod) *podWorker {
	short := strings.ReplaceAll(string(pod.UID), "-", "")
	if len(short) > 8 {
		short = short[:8]
	}
	w := &podWorker{
		k:         k,
		uid:       pod.UID,
		namespace: pod.Namespace,
		name:      pod.Name,
		key:       pod.Namespace + "/" + pod.Name,
		netns:     k.netnsPrefix() + short,
		veth:      k.cfg.bridge + short,
		dir:       filepath.Join(k.cfg.dir, "pods", string(pod.UID)),
		pod:       pod,
		startTime: metav1.Now(),
		stopping:  make(chan struct{}),
		dirty:     make(chan struct{}, 1),
	}
	for i := range pod.Spec.InitContainers {
		w.inits = append(w.inits, newContainer(w, pod.Spec.InitContainers[i], true))
	}
	for i := range pod.Spec.Containers {
		w.containers = append(w.containers, newContainer(w, pod.Spec.Containers[i], false))
	}
	return w
}

// update records the pod's latest object; a deletionTimestamp starts the
// graceful stop.
func (w *podWorker) update(pod *corev1.Pod) {
	w.mu.Lock()
	w.pod = pod
	deleting := pod.DeletionTimestamp != nil
	if deleting {
		w.deleteRequested = true
	}
	w.mu.Unlock()
	if deleting {
		grace := ptr.Deref(pod.DeletionGracePeriodSeconds, ptr.Deref(pod.Spec.TerminationGracePeriodSeconds, 30))
		w.stop(time.Duration(grace) * time.Second)
	}
}

// objectGone stops the pod after its API object vanished (force delete).
func (w *podWorker) objectGone() {
	w.mu.Lock()
	w.gone = true
	grace := ptr.Deref(w.pod.Spec.TerminationGracePeriodSeconds, 30)
	w.mu.Unlock()
	w.stop(time.Duration(grace) * time.Second)
}

// stop starts the graceful stop, or shortens a running one's deadline.
func (w *podWorker) stop(grace time.Duration) {
	deadline := time.Now().Add(grace)
	w.mu.Lock()
	if w.deadline.IsZero() || deadline.Before(w.deadline) {
		w.deadline = deadline
	}
	w.mu.Unlock()
	w.stopOnce.Do(func() { close(w.stopping) })
}

// stopDeadline returns the current end of the grace period.
func (w *podWorker) stopDeadline() time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.deadline
}

func (w *podWorker) isStopping() bool {
	select {
	case <-w.stopping:
		return true
	default:
		return false
	}
}

// markDirty asks for a status PATCH (coalesced).
func (w *podWorker) markDirty() {
	select {
	case w.dirty <- struct{}{}:
	default:
	}
}

// run is the pod's whole life; see the package doc.
func (w *podWorker) run(ctx context.Context) {
	go func() {
		select {
		case <-ctx.Done():
			w.stop(shutdownGrace)
		case <-w.stopping:
		}
	}()
	statusCtx, stopStatus := context.WithCancel(context.Background())
	statusDone := make(chan struct{})
	go func() { defer close(statusDone); w.statusLoop(statusCtx) }()
	defer func() {
		stopStatus()
		<-statusDone
		w.teardownSandbox()
	}()

	if !w.setup(ctx) {
		w.finish(ctx)
		return
	}
	tokenCtx, stopTokens := context.WithCancel(ctx)
	defer stopTokens()
	w.mu.Lock()
	pod := w.pod
	w.mu.Unlock()
	go w.refreshTokens(tokenCtx, pod)

	for _, c := range w.inits {
		if code := c.loop(ctx); code != 0 || w.isStopping() {
			w.mu.Lock()
			w.initFailed = code != 0
			w.mu.Unlock()
			w.markDirty()
			w.finish(ctx)
			return
		}
	}
	w.mu.Lock()
	w.initialized = true
	w.mu.Unlock()
	w.markDirty()

	var wg sync.WaitGroup
	for _, c := range w.containers {
		wg.Add(1)
		go func() { defer wg.Done(); c.loop(ctx) }()
	}
	wg.Wait()
	w.finish(ctx)
}

// setup makes the sandbox and volumes, retrying until it works or the pod
// is stopped.
func (w *podWorker) setup(ctx context.Context) bool {
	for {
		w.mu.Lock()
		pod := w.pod
		w.mu.Unlock()
		err := w.setupSandbox(pod)
		if err == nil {
			err = w.prepareVolumes(ctx, pod)
		}
		if err == nil {
			w.mu.Lock()
			w.sandboxReady = true
			w.message = ""
			w.mu.Unlock()
			w.markDirty()
			klog.Infof("pod %s: sandbox %s up, IP %s", w.key, w.netns, w.ip)
			return true
		}
		klog.Warningf("pod %s: setting up: %v (retrying in %v)", w.key, err, sandboxRetry)
		w.teardownSandbox()
		w.mu.Lock()
		w.message = err.Error()
		w.mu.Unlock()
		w.markDirty()
		select {
		case <-w.stopping:
			return false
		case <-time.After(sandboxRetry):
		}
	}
}

// finish reports the final status and, for a deleted pod, deletes it with
// grace 0 (the real kubelet's last word on a pod).
func (w *podWorker) finish(ctx context.Context) {
	if ctx.Err() != nil {
		return // kubelet shutdown: leave the API objects alone
	}
	w.mu.Lock()
	gone, deleting, pod := w.gone, w.deleteRequested, w.pod
	w.mu.Unlock()
	if gone {
		return
	}
	if !deleting {
		w.k.markFinished(w.uid)
	}
	if err := w.patchStatus(); err != nil && !isGone(err) {
		klog.Warningf("pod %s: final status: %v", w.key, err)
	}
	if deleting {
		fctx, cancel := context.WithTimeout(ctx, apiTimeout)
		defer cancel()
		w.k.finalize(fctx, pod)
		klog.Infof("pod %s: terminated and deleted", w.key)
	}
}

// statusLoop sends a PATCH whenever the status changed, until ctx ends.
func (w *podWorker) statusLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.dirty:
		}
		err := w.patchStatus()
		if err == nil || isGone(err) {
			continue
		}
		if ctx.Err() == nil {
			klog.Warningf("pod %s: status patch: %v (retrying)", w.key, err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
			w.markDirty()
		}
	}
}

// patchStatus PATCHes pods/status with the status as of now.
func (w *podWorker) patchStatus() error {
	w.patchMu.Lock()
	defer w.patchMu.Unlock()
	w.mu.Lock()
	if w.gone {
		w.mu.Unlock()
		return nil
	}
	status := w.buildStatus()
	w.mu.Unlock()
	body, err := json.Marshal(map[string]interface{}{"status": status})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
	defer cancel()
	_, err = w.k.client.CoreV1().Pods(w.namespace).Patch(ctx, w.name, types.MergePatchType, body, metav1.PatchOptions{}, "status")
	return err
}

// isGone says whether err means the pod object no longer exists (or is a
// new pod of the same name).
func isGone(err error) bool {
	return apierrors.IsNotFound(err) || apierrors.IsConflict(err) || errors.Is(err, context.Canceled)
}

// buildStatus computes the pod status like a kubelet; w.mu is held.
func (w *podWorker) buildStatus() corev1.PodStatus {
	st := corev1.PodStatus{
		HostIP:    w.k.cfg.bridgeIP.String(),
		HostIPs:   []corev1.HostIP{{IP: w.k.cfg.bridgeIP.String()}},
		StartTime: &w.startTime,
		QOSClass:  w.pod.Status.QOSClass,
		Message:   w.message,
	}
	if w.sandboxReady && w.ip != nil {
		st.PodIP = w.ip.String()
		st.PodIPs = []corev1.PodIP{{IP: w.ip.String()}}
	}
	for _, c := range w.inits {
		st.InitContainerStatuses = append(st.InitContainerStatuses, c.statusLocked())
	}
	allReady, anyStarted, allDone, allSucceeded := len(w.containers) > 0, false, true, true
	for _, c := range w.containers {
		cs := c.statusLocked()
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
		allReady = allReady && cs.Ready
		anyStarted = anyStarted || c.everStarted
		if !c.finished {
			allDone = false
		} else if cs.State.Terminated == nil || cs.State.Terminated.ExitCode != 0 {
			allSucceeded = false
		}
	}
	switch {
	case w.initFailed:
		st.Phase = corev1.PodFailed
	case !w.initialized || !anyStarted:
		st.Phase = corev1.PodPending
	case allDone && allSucceeded:
		st.Phase = corev1.PodSucceeded
	case allDone:
		st.Phase = corev1.PodFailed
	default:
		st.Phase = corev1.PodRunning
	}
	if st.Phase == corev1.PodPending && w.message != "" {
		st.Reason = "SandboxSetupFailed"
	}
	cond := func(t corev1.PodConditionType, ok bool, reason string) {
		status := corev1.ConditionFalse
		if ok {
			status = corev1.ConditionTrue
			reason = ""
		}
		c := corev1.PodCondition{Type: t, Status: status, Reason: reason, LastTransitionTime: metav1.Now()}
		for _, old := range w.pod.Status.Conditions {
			if old.Type == t && old.Status == status {
				c.LastTransitionTime = old.LastTransitionTime
			}
		}
		st.Conditions = append(st.Conditions, c)
	}
	running := st.Phase == corev1.PodRunning
	cond(corev1.PodReadyToStartContainers, w.sandboxReady, "")
	cond(corev1.PodInitialized, w.initialized, "ContainersNotInitialized")
	cond(corev1.ContainersReady, allReady && running, "ContainersNotReady")
	cond(corev1.PodReady, allReady && running, "ContainersNotReady")
	cond(corev1.PodScheduled, true, "")
	return st
}

// markFinished remembers a pod that ran to completion, so a late informer
// event does not start it again.
func (k *kubelet) markFinished(uid types.UID) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.finished == nil {
		k.finished = map[types.UID]bool{}
	}
	k.finished[uid] = true
}

// appendLine appends a line to a container's log (for kubelet-side events
// such as probe failures, which real runtimes keep in events instead).
func appendLine(path, line string) {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s testbed-kubelet: %s\n", time.Now().UTC().Format(time.RFC3339Nano), line)
}
