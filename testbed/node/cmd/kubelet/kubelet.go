package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

// kubelet owns the Node and one podWorker per pod UID bound to it.
type kubelet struct {
	cfg     config
	client  kubernetes.Interface
	nodeUID types.UID

	mu      sync.Mutex
	workers map[types.UID]*podWorker
	// usedIPs maps host numbers in the pod network to the pod holding them.
	usedIPs map[uint32]types.UID
	// lastIP is the host number handed out last; allocation goes round-robin
	// from it so a fresh pod does not get a just-freed address.
	lastIP uint32
	// finished holds pods that ran to completion (and are not deleted).
	finished map[types.UID]bool
	wg       sync.WaitGroup
}

func newKubelet(cfg config, client kubernetes.Interface) *kubelet {
	return &kubelet{
		cfg:     cfg,
		client:  client,
		workers: map[types.UID]*podWorker{},
		usedIPs: map[uint32]types.UID{},
	}
}

// run registers the Node, runs pods until ctx ends, then stops every pod and
// removes their sandboxes.
func (k *kubelet) run(ctx context.Context) error {
	_ = os.Remove(k.readyFile())
	k.removeLeftovers()
	if err := k.registerNode(ctx); err != nil {
		return err
	}
	hbCtx, hbCancel := context.WithCancel(context.Background())
	defer hbCancel()
	go k.heartbeat(hbCtx)

	factory := informers.NewSharedInformerFactoryWithOptions(k.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", k.cfg.nodeName).String()
		}))
	podInformer := factory.Core().V1().Pods().Informer()
	_, err := podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj interface{}) { k.podChanged(ctx, obj) },
		UpdateFunc: func(_, obj interface{}) { k.podChanged(ctx, obj) },
		DeleteFunc: func(obj interface{}) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				k.podDeleted(pod)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("cannot watch pods: %w", err)
	}
	informerStop := make(chan struct{})
	factory.Start(informerStop)
	if !cache.WaitForCacheSync(ctx.Done(), podInformer.HasSynced) {
		close(informerStop)
		factory.Shutdown()
		k.wg.Wait()
		k.removeLeftovers()
		return nil
	}
	if err := k.markReady(); err != nil {
		return fmt.Errorf("cannot write %s: %w", k.readyFile(), err)
	}
	klog.Infof("node %s is ready; pods run on %s (%s)", k.cfg.nodeName, k.cfg.bridge, k.cfg.podNet)

	<-ctx.Done()
	close(informerStop)
	factory.Shutdown()
	k.wg.Wait()
	hbCancel()
	_ = os.Remove(k.readyFile())
	k.removeLeftovers()
	return nil
}

// podChanged hands a pod's latest spec to its worker, starting one for a
// new pod.
func (k *kubelet) podChanged(ctx context.Context, obj interface{}) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || ctx.Err() != nil {
		return
	}
	k.mu.Lock()
	w, ok := k.workers[pod.UID]
	if !ok {
		// A pod that ran to completion, or that is being deleted before
		// (or after) this kubelet ran it, is not started: only finalized.
		if k.finished[pod.UID] || pod.DeletionTimestamp != nil ||
			pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			k.mu.Unlock()
			if pod.DeletionTimestamp != nil {
				k.finalize(ctx, pod)
			}
			return
		}
		w = newPodWorker(k, pod)
		k.workers[pod.UID] = w
		k.wg.Add(1)
		go func() {
			defer k.wg.Done()
			w.run(ctx)
			k.mu.Lock()
			delete(k.workers, pod.UID)
			k.mu.Unlock()
		}()
	}
	k.mu.Unlock()
	w.update(pod)
}

// podDeleted tells a pod's worker that its API object is gone.
func (k *kubelet) podDeleted(pod *corev1.Pod) {
	k.mu.Lock()
	w := k.workers[pod.UID]
	delete(k.finished, pod.UID)
	k.mu.Unlock()
	if w != nil {
		w.objectGone()
	}
}

// finalize deletes a pod whose processes have all ended (grace 0, only
// this UID), as the real kubelet does once a pod is terminated.
func (k *kubelet) finalize(ctx context.Context, pod *corev1.Pod) {
	uid := pod.UID
	err := k.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: new(int64),
		Preconditions:      &metav1.Preconditions{UID: &uid},
	})
	if err != nil && !isGone(err) {
		klog.Warningf("pod %s/%s: final delete: %v", pod.Namespace, pod.Name, err)
	}
}

// allocateIP hands out a free pod address, round-robin.
func (k *kubelet) allocateIP(uid types.UID) (net.IP, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	base := binary.BigEndian.Uint32(k.cfg.podNet.IP.To4())
	ones, bits := k.cfg.podNet.Mask.Size()
	size := uint32(1) << uint(bits-ones)
	bridge := binary.BigEndian.Uint32(k.cfg.bridgeIP)
	for i := uint32(1); i < size; i++ {
		n := (k.lastIP+i)%size + 0
		if n == 0 || n == size-1 || base+n == bridge {
			continue
		}
		if _, used := k.usedIPs[n]; used {
			continue
		}
		k.usedIPs[n] = uid
		k.lastIP = n
		ip := make(net.IP, 4)
		binary.BigEndian.PutUint32(ip, base+n)
		return ip, nil
	}
	return nil, fmt.Errorf("pod network %s is full", k.cfg.podNet)
}

func (k *kubelet) releaseIP(ip net.IP) {
	if ip == nil {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	n := binary.BigEndian.Uint32(ip.To4()) - binary.BigEndian.Uint32(k.cfg.podNet.IP.To4())
	delete(k.usedIPs, n)
}

// netnsPrefix starts the name of every network namespace this kubelet makes.
func (k *kubelet) netnsPrefix() string { return k.cfg.bridge + "-" }

// removeLeftovers kills the processes of, and deletes, every pod network
// namespace of this bridge (from a crashed run or at shutdown).
func (k *kubelet) removeLeftovers() {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), k.netnsPrefix()) {
			killNetns(e.Name())
			deleteNetns(e.Name())
		}
	}
}

// killNetns SIGKILLs every process in a network namespace.
func killNetns(ns string) {
	out, err := exec.Command("ip", "netns", "pids", ns).Output()
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// deleteNetns removes a network namespace (its veth goes with it) and its
// /etc/netns directory.
func deleteNetns(ns string) {
	if _, err := os.Stat(filepath.Join("/run/netns", ns)); os.IsNotExist(err) {
		_ = os.RemoveAll(filepath.Join("/etc/netns", ns))
		return
	}
	if out, err := exec.Command("ip", "netns", "delete", ns).CombinedOutput(); err != nil {
		klog.Warningf("ip netns delete %s: %v: %s", ns, err, strings.TrimSpace(string(out)))
	}
	_ = os.RemoveAll(filepath.Join("/etc/netns", ns))
}

// ipCmd runs ip(8) with args.
func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// setupSandbox gives the pod its network namespace: a veth whose host end
// joins the bridge and whose pod end is eth0 with the pod IP and a default
// route via the bridge, plus /etc/netns/<ns>/{resolv.conf,hosts}, which
// `ip netns exec` mounts over /etc.
func (w *podWorker) setupSandbox(pod *corev1.Pod) error {
	cfg := w.k.cfg
	ip, err := w.k.allocateIP(pod.UID)
	if err != nil {
		return err
	}
	w.mu.Lock()
	w.ip = ip
	w.mu.Unlock()
	ones, _ := cfg.podNet.Mask.Size()
	deleteNetns(w.netns)
	steps := [][]string{
		{"netns", "add", w.netns},
		{"link", "add", w.veth, "type", "veth", "peer", "name", "eth0", "netns", w.netns},
		{"link", "set", w.veth, "master", cfg.bridge, "up"},
		{"-n", w.netns, "link", "set", "lo", "up"},
		{"-n", w.netns, "addr", "add", fmt.Sprintf("%s/%d", ip, ones), "dev", "eth0"},
		{"-n", w.netns, "link", "set", "eth0", "up"},
		{"-n", w.netns, "route", "add", "default", "via", cfg.bridgeIP.String()},
	}
	for _, s := range steps {
		if err := ipCmd(s...); err != nil {
			return err
		}
	}
	etc := filepath.Join("/etc/netns", w.netns)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return err
	}
	search := fmt.Sprintf("%s.svc.%s svc.%s %s", pod.Namespace, cfg.clusterDomain, cfg.clusterDomain, cfg.clusterDomain)
	resolv := fmt.Sprintf("search %s\nnameserver %s\noptions ndots:5\n", search, cfg.dnsIP)
	hostname := pod.Name
	if pod.Spec.Hostname != "" {
		hostname = pod.Spec.Hostname
	}
	hosts := fmt.Sprintf("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n", ip, hostname)
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte(resolv), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(etc, "hosts"), []byte(hosts), 0o644); err != nil {
		return err
	}
	info := fmt.Sprintf("uid=%s\nnetns=%s\nveth=%s\nip=%s\n", pod.UID, w.netns, w.veth, ip)
	return os.WriteFile(w.infoFile(), []byte(info), 0o644)
}

// infoFile is DIR/pods/<ns>_<name>.pod: the netns, veth and IP that
// scripts/testbed's fault hooks look up by pod name.
func (w *podWorker) infoFile() string {
	return filepath.Join(w.k.cfg.dir, "pods", w.namespace+"_"+w.name+".pod")
}

// teardownSandbox kills what is left in the namespace and removes it, the
// info file (if still this pod's) and the pod directory.
func (w *podWorker) teardownSandbox() {
	killNetns(w.netns)
	deleteNetns(w.netns)
	if data, err := os.ReadFile(w.infoFile()); err == nil && strings.Contains(string(data), "uid="+string(w.uid)+"\n") {
		_ = os.Remove(w.infoFile())
	}
	_ = os.RemoveAll(w.dir)
	w.mu.Lock()
	ip := w.ip
	w.mu.Unlock()
	w.k.releaseIP(ip)
}

// waitGone waits (bounded) until a pid has exited; used after SIGKILL.
func waitGone(done <-chan struct{}, limit time.Duration) bool {
	select {
	case <-done:
		return true
	case <-time.After(limit):
		return false
	}
}
