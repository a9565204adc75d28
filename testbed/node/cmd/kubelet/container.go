package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

// longRun is how long a container must run for its restart back-off to
// start over.
const longRun = time.Minute

// container is one container of a pod; its fields after spec are guarded by
// the pod worker's mu.
type container struct {
	w    *podWorker
	spec corev1.Container
	init bool

	status      corev1.ContainerStatus
	everStarted bool
	// finished means the container ended and will not restart.
	finished bool
}

// process is one run of a container's command.
type process struct {
	cmd      *exec.Cmd
	pid      int
	started  time.Time
	done     chan struct{}
	exitCode int
}

func newContainer(w *podWorker, spec corev1.Container, init bool) *container {
	return &container{
		w: w, spec: spec, init: init,
		status: corev1.ContainerStatus{
			Name:  spec.Name,
			Image: spec.Image,
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}},
		},
	}
}

// statusLocked returns a copy of the container status; w.mu is held.
func (c *container) statusLocked() corev1.ContainerStatus {
	return *c.status.DeepCopy()
}

// setStatus changes the status under the pod lock and asks for a PATCH.
func (c *container) setStatus(change func(s *corev1.ContainerStatus)) {
	c.w.mu.Lock()
	change(&c.status)
	c.w.mu.Unlock()
	c.w.markDirty()
}

// logFile is DIR/logs/<ns>_<pod>_<container>.log.
func (c *container) logFile() string {
	w := c.w
	return filepath.Join(w.k.cfg.dir, "logs", fmt.Sprintf("%s_%s_%s.log", w.namespace, w.name, c.spec.Name))
}

// loop runs the container, restarting it per the pod's restart policy with
// a doubling back-off, until it ends for good or the pod stops; it returns
// the last exit code.
func (c *container) loop(ctx context.Context) int {
	w := c.w
	w.mu.Lock()
	policy := w.pod.Spec.RestartPolicy
	w.mu.Unlock()
	crashes := 0
	for {
		if w.isStopping() {
			c.end()
			return 0
		}
		exit, ran := c.runOnce(ctx)
		if w.isStopping() {
			c.end()
			return exit
		}
		restart := policy == corev1.RestartPolicyAlways || policy == "" ||
			(policy == corev1.RestartPolicyOnFailure && exit != 0)
		if c.init {
			restart = exit != 0 && policy != corev1.RestartPolicyNever
		}
		if !restart {
			c.end()
			return exit
		}
		if ran >= longRun {
			crashes = 0
		}
		delay := w.k.cfg.restartBackoff << uint(crashes)
		if delay > w.k.cfg.maxRestartDelay || delay <= 0 {
			delay = w.k.cfg.maxRestartDelay
		}
		crashes++
		c.setStatus(func(s *corev1.ContainerStatus) {
			s.LastTerminationState = s.State
			s.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{
				Reason:  "CrashLoopBackOff",
				Message: fmt.Sprintf("back-off %v restarting failed container=%s pod=%s", delay, c.spec.Name, w.name),
			}}
		})
		select {
		case <-w.stopping:
			c.end()
			return exit
		case <-time.After(delay):
		}
		c.setStatus(func(s *corev1.ContainerStatus) { s.RestartCount++ })
	}
}

// end marks the container as finished for good.
func (c *container) end() {
	c.setStatus(func(s *corev1.ContainerStatus) {
		s.Ready = false
		s.Started = ptr.To(false)
	})
	c.w.mu.Lock()
	c.finished = true
	c.w.mu.Unlock()
}

// runOnce starts the process, probes it, stops it when the pod stops, and
// records how it ended; it returns the exit code and how long it ran.
func (c *container) runOnce(ctx context.Context) (int, time.Duration) {
	w := c.w
	p, err := c.start(ctx)
	if err != nil {
		klog.Warningf("pod %s: container %s: %v", w.key, c.spec.Name, err)
		appendLine(c.logFile(), "cannot start: "+err.Error())
		now := metav1.Now()
		c.setStatus(func(s *corev1.ContainerStatus) {
			s.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
				ExitCode: 128, Reason: "StartError", Message: err.Error(), StartedAt: now, FinishedAt: now,
			}}
		})
		return 128, 0
	}
	w.mu.Lock()
	c.everStarted = true
	w.mu.Unlock()
	startedAt := metav1.NewTime(p.started)
	c.setStatus(func(s *corev1.ContainerStatus) {
		s.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: startedAt}}
		s.ContainerID = fmt.Sprintf("testbed://%d", p.pid)
		s.ImageID = "testbed://" + c.spec.Image
		s.Ready = false
		s.Started = ptr.To(false)
	})
	probeCtx, stopProbes := context.WithCancel(ctx)
	if !c.init {
		go c.probe(probeCtx, p)
	}
	select {
	case <-p.done:
	case <-w.stopping:
		c.terminate(p, w.stopDeadline)
	}
	stopProbes()
	finished := metav1.Now()
	reason := "Completed"
	if p.exitCode != 0 {
		reason = "Error"
	}
	c.setStatus(func(s *corev1.ContainerStatus) {
		s.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: int32(p.exitCode), Reason: reason, StartedAt: startedAt, FinishedAt: finished,
			ContainerID: s.ContainerID,
		}}
		s.Ready = false
		s.Started = ptr.To(false)
	})
	klog.Infof("pod %s: container %s (pid %d) exited with %d", w.key, c.spec.Name, p.pid, p.exitCode)
	return p.exitCode, time.Since(p.started)
}

// terminate sends SIGTERM, waits until the deadline (re-read, as a later
// delete may shorten it), then SIGKILLs the process group.
func (c *container) terminate(p *process, deadline func() time.Time) {
	_ = syscall.Kill(p.pid, syscall.SIGTERM)
	for {
		left := time.Until(deadline())
		if left <= 0 {
			break
		}
		if left > 100*time.Millisecond {
			left = 100 * time.Millisecond
		}
		select {
		case <-p.done:
			return
		case <-time.After(left):
		}
	}
	klog.Infof("pod %s: container %s (pid %d) outlived its grace period: SIGKILL", c.w.key, c.spec.Name, p.pid)
	_ = syscall.Kill(-p.pid, syscall.SIGKILL)
	waitGone(p.done, 5*time.Second)
}

// podExecSpec is what `kubelet pod-exec` is told (as one JSON argument).
type podExecSpec struct {
	Hostname string   `json:"hostname"`
	Workdir  string   `json:"workdir"`
	Mounts   []mount  `json:"mounts"`
	Argv     []string `json:"argv"`
}

// start launches the container's process inside the pod's namespaces:
// `ip netns exec <ns> <self> pod-exec <spec>`, which execs the command, so
// the pid is the container's main process; its output goes to the log file.
func (c *container) start(ctx context.Context) (*process, error) {
	w := c.w
	w.mu.Lock()
	pod := w.pod
	w.mu.Unlock()
	envList, envMap, err := w.containerEnv(ctx, pod, &c.spec)
	if err != nil {
		return nil, err
	}
	argv, err := w.k.resolveArgv(&c.spec)
	if err != nil {
		return nil, err
	}
	lookup := func(name string) (string, bool) { v, ok := envMap[name]; return v, ok }
	for i := range argv {
		argv[i] = expand(argv[i], lookup)
	}
	mounts, err := w.mountsFor(pod, &c.spec)
	if err != nil {
		return nil, err
	}
	hostname := pod.Name
	if pod.Spec.Hostname != "" {
		hostname = pod.Spec.Hostname
	}
	spec, err := json.Marshal(podExecSpec{Hostname: hostname, Workdir: c.spec.WorkingDir, Mounts: mounts, Argv: argv})
	if err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(c.logFile(), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", "netns", "exec", w.netns, w.k.cfg.self, "pod-exec", string(spec))
	cmd.Env = envList
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("starting %v: %w", argv, err)
	}
	p := &process{cmd: cmd, pid: cmd.Process.Pid, started: time.Now(), done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		logf.Close()
		p.exitCode = 0
		if err != nil {
			p.exitCode = 1
			if ee, ok := err.(*exec.ExitError); ok {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok {
					switch {
					case ws.Signaled():
						p.exitCode = 128 + int(ws.Signal())
					default:
						p.exitCode = ws.ExitStatus()
					}
				}
			}
		}
		// Whatever the main process left behind in its group goes with it.
		_ = syscall.Kill(-p.pid, syscall.SIGKILL)
		close(p.done)
	}()
	klog.Infof("pod %s: container %s started (pid %d): %s", w.key, c.spec.Name, p.pid, strings.Join(argv, " "))
	return p, nil
}

// Images the test bed maps to host commands, by the image's last path
// segment without tag or digest: the entrypoint and the default command.
var hostImages = map[string]struct{ entrypoint, cmd []string }{
	"busybox": {nil, []string{"/bin/sh"}},
	"alpine":  {nil, []string{"/bin/sh"}},
	"debian":  {nil, []string{"/bin/bash"}},
	"ubuntu":  {nil, []string{"/bin/bash"}},
	"bash":    {nil, []string{"/bin/bash"}},
	"curl":    {[]string{"curl"}, nil},
}

// imageName returns an image's last path segment without tag or digest:
// "ghcr.io/x/raft-elector:1.2" → "raft-elector".
func imageName(image string) string {
	if i := strings.Index(image, "@"); i >= 0 {
		image = image[:i]
	}
	if i := strings.LastIndex(image, "/"); i >= 0 {
		image = image[i+1:]
	}
	if i := strings.Index(image, ":"); i >= 0 {
		image = image[:i]
	}
	return image
}

// resolveArgv maps a container to a host command line: images named
// raft-elector run --raft-elector-bin with the args; command overrides the
// entrypoint as in Kubernetes; a command named raft-elector maps too.
func (k *kubelet) resolveArgv(c *corev1.Container) ([]string, error) {
	name := imageName(c.Image)
	var entry, cmd []string
	if name == "raft-elector" {
		if k.cfg.raftElectorBin == "" {
			return nil, fmt.Errorf("image %s maps to raft-elector, but no binary was given (--raft-elector-bin or RAFT_ELECTOR_TESTBED_BIN)", c.Image)
		}
		entry = []string{k.cfg.raftElectorBin}
	} else if m, ok := hostImages[name]; ok {
		entry, cmd = m.entrypoint, m.cmd
	}
	var argv []string
	switch {
	case len(c.Command) > 0:
		argv = append(append(argv, c.Command...), c.Args...)
	case len(c.Args) > 0:
		argv = append(append(argv, entry...), c.Args...)
	default:
		argv = append(append(argv, entry...), cmd...)
	}
	if len(argv) == 0 {
		return nil, fmt.Errorf("image %s has no local mapping and the container gives no command", c.Image)
	}
	if filepath.Base(argv[0]) == "raft-elector" && k.cfg.raftElectorBin != "" {
		argv[0] = k.cfg.raftElectorBin
	}
	return argv, nil
}

// probe runs the startup, liveness and readiness probes of one process run.
// A container without a readiness probe is ready once started; a failed
// liveness or startup probe stops the process (the restart policy decides
// what follows).
func (c *container) probe(ctx context.Context, p *process) {
	started := make(chan struct{})
	if sp := c.spec.StartupProbe; sp != nil {
		go func() {
			c.runProber(ctx, p, sp, "startup", func(ok bool) bool {
				if ok {
					close(started)
					return false
				}
				return true
			})
		}()
	} else {
		close(started)
	}
	select {
	case <-ctx.Done():
		return
	case <-started:
	}
	c.setStatus(func(s *corev1.ContainerStatus) {
		s.Started = ptr.To(true)
		if c.spec.ReadinessProbe == nil {
			s.Ready = true
		}
	})
	if lp := c.spec.LivenessProbe; lp != nil {
		go c.runProber(ctx, p, lp, "liveness", func(ok bool) bool { return true })
	}
	if rp := c.spec.ReadinessProbe; rp != nil {
		c.runProber(ctx, p, rp, "readiness", func(ok bool) bool {
			c.w.mu.Lock()
			changed := c.status.Ready != ok
			c.status.Ready = ok
			c.w.mu.Unlock()
			if changed {
				c.w.markDirty()
			}
			return true
		})
	}
}

// runProber probes every period after the initial delay, applying the
// success and failure thresholds; onResult gets each thresholded result and
// says whether to go on. Liveness and startup failures kill the process.
func (c *container) runProber(ctx context.Context, p *process, pr *corev1.Probe, kind string, onResult func(ok bool) bool) {
	period := secondsOr(pr.PeriodSeconds, 10)
	timeout := secondsOr(pr.TimeoutSeconds, 1)
	successNeeded := int(max(pr.SuccessThreshold, 1))
	failuresNeeded := int(max(pr.FailureThreshold, 1))
	if pr.FailureThreshold == 0 {
		failuresNeeded = 3
	}
	select {
	case <-ctx.Done():
		return
	case <-time.After(time.Duration(pr.InitialDelaySeconds) * time.Second):
	}
	successes, failures := 0, 0
	for {
		err := c.probeOnce(ctx, pr, timeout)
		if ctx.Err() != nil {
			return
		}
		result := -1
		if err == nil {
			successes, failures = successes+1, 0
			if successes >= successNeeded {
				result = 1
			}
		} else {
			successes, failures = 0, failures+1
			if failures >= failuresNeeded {
				result = 0
			}
		}
		if result == 0 && (kind == "liveness" || kind == "startup") {
			msg := fmt.Sprintf("%s probe failed %d times (%v): stopping the container", kind, failures, err)
			klog.Infof("pod %s: container %s: %s", c.w.key, c.spec.Name, msg)
			appendLine(c.logFile(), msg)
			c.w.mu.Lock()
			podGrace := c.w.pod.Spec.TerminationGracePeriodSeconds
			c.w.mu.Unlock()
			grace := ptr.Deref(pr.TerminationGracePeriodSeconds, ptr.Deref(podGrace, 30))
			deadline := time.Now().Add(time.Duration(grace) * time.Second)
			c.terminate(p, func() time.Time { return deadline })
			return
		}
		if result >= 0 && !onResult(result == 1) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(period):
		}
	}
}

func secondsOr(v int32, def int32) time.Duration {
	if v <= 0 {
		v = def
	}
	return time.Duration(v) * time.Second
}

// probeClient never keeps connections, like the real kubelet's prober.
var probeClient = &http.Client{
	Transport: &http.Transport{
		DisableKeepAlives: true,
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // probes do not verify, as in Kubernetes
	},
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// probeOnce runs one HTTP GET, TCP connect or exec probe.
func (c *container) probeOnce(ctx context.Context, pr *corev1.Probe, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c.w.mu.Lock()
	ip := c.w.ip.String()
	c.w.mu.Unlock()
	switch {
	case pr.HTTPGet != nil:
		g := pr.HTTPGet
		port, err := c.port(g.Port)
		if err != nil {
			return err
		}
		host := g.Host
		if host == "" {
			host = ip
		}
		scheme := "http"
		if g.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		path := g.Path
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), path), nil)
		if err != nil {
			return err
		}
		req.Header.Set("User-Agent", "kube-probe/1.35")
		for _, h := range g.HTTPHeaders {
			req.Header.Set(h.Name, h.Value)
		}
		resp, err := probeClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		return nil
	case pr.TCPSocket != nil:
		port, err := c.port(pr.TCPSocket.Port)
		if err != nil {
			return err
		}
		host := pr.TCPSocket.Host
		if host == "" {
			host = ip
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case pr.Exec != nil:
		if len(pr.Exec.Command) == 0 {
			return fmt.Errorf("exec probe without a command")
		}
		args := append([]string{"netns", "exec", c.w.netns}, pr.Exec.Command...)
		return exec.CommandContext(ctx, "ip", args...).Run()
	}
	return fmt.Errorf("unsupported probe (the test bed knows httpGet, tcpSocket, exec)")
}

// port resolves a probe port, by number or by the container port's name.
func (c *container) port(p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.spec.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil {
		return n, nil
	}
	return 0, fmt.Errorf("container %s has no port named %q", c.spec.Name, p.StrVal)
}
