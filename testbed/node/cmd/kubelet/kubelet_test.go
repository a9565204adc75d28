package main

import (
	"net"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func testKubelet(t *testing.T) *kubelet {
	t.Helper()
	_, podNet, err := net.ParseCIDR("10.244.9.0/29")
	if err != nil {
		t.Fatal(err)
	}
	return newKubelet(config{
		bridge:         "tb",
		bridgeIP:       net.ParseIP("10.244.9.1").To4(),
		podNet:         podNet,
		apiHost:        "10.244.9.1",
		apiPort:        "6443",
		raftElectorBin: "/bin/raft-elector-built",
	}, nil)
}

func TestExpandReplacesKnownReferencesAndKeepsUnknownOnes(t *testing.T) {
	env := map[string]string{"A": "1", "POD_IP": "10.0.0.2"}
	lookup := func(n string) (string, bool) { v, ok := env[n]; return v, ok }
	cases := map[string]string{
		"$(POD_IP):4041": "10.0.0.2:4041",
		"$(MISSING)":     "$(MISSING)",
		"$$(A)":          "$(A)",
		"a$(A)b$(A)":     "a1b1",
		"$(A":            "$(A",
		"cost $5":        "cost $5",
		"trailing $":     "trailing $",
	}
	for in, want := range cases {
		if got := expand(in, lookup); got != want {
			t.Errorf("expand(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestImageNameDropsRegistryTagAndDigest(t *testing.T) {
	cases := map[string]string{
		"raft-elector:dev":                     "raft-elector",
		"ghcr.io/acme/raft-elector:1.2":        "raft-elector",
		"localhost:5000/raft-elector":          "raft-elector",
		"raft-elector@sha256:abc":              "raft-elector",
		"curlimages/curl:8.0":                  "curl",
		"docker.io/library/busybox:1.36":       "busybox",
		"registry.example:443/x/y/z:latest":    "z",
		"registry.example:443/x/y/z@sha256:ff": "z",
	}
	for in, want := range cases {
		if got := imageName(in); got != want {
			t.Errorf("imageName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestResolveArgvMapsImagesLikeAnEntrypointAndCommand(t *testing.T) {
	k := testKubelet(t)
	cases := []struct {
		c    corev1.Container
		want []string
	}{
		{corev1.Container{Image: "ghcr.io/x/raft-elector:v1", Args: []string{"run", "--id", "a"}}, []string{"/bin/raft-elector-built", "run", "--id", "a"}},
		{corev1.Container{Image: "raft-elector:dev", Command: []string{"/usr/local/bin/raft-elector"}, Args: []string{"run"}}, []string{"/bin/raft-elector-built", "run"}},
		{corev1.Container{Image: "busybox"}, []string{"/bin/sh"}},
		{corev1.Container{Image: "busybox", Command: []string{"sh", "-c", "true"}}, []string{"sh", "-c", "true"}},
		{corev1.Container{Image: "curlimages/curl", Args: []string{"-s", "http://x"}}, []string{"curl", "-s", "http://x"}},
	}
	for _, tc := range cases {
		got, err := k.resolveArgv(&tc.c)
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("resolveArgv(%+v) = %v, %v; want %v", tc.c, got, err, tc.want)
		}
	}
	if _, err := k.resolveArgv(&corev1.Container{Image: "nginx"}); err == nil {
		t.Error("an unmapped image without a command must be refused")
	}
	k.cfg.raftElectorBin = ""
	if _, err := k.resolveArgv(&corev1.Container{Image: "raft-elector:dev"}); err == nil {
		t.Error("the raft-elector image without a binary must be refused")
	}
}

func TestAllocateIPGoesRoundRobinSkipsTheBridgeAndRunsOut(t *testing.T) {
	k := testKubelet(t) // 10.244.9.0/29: hosts .1 (bridge) to .6
	var got []string
	for i := 0; i < 5; i++ {
		ip, err := k.allocateIP(types.UID(string(rune('a' + i))))
		if err != nil {
			t.Fatalf("allocation %d: %v", i, err)
		}
		got = append(got, ip.String())
	}
	want := []string{"10.244.9.2", "10.244.9.3", "10.244.9.4", "10.244.9.5", "10.244.9.6"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("allocated %v, want %v", got, want)
	}
	if _, err := k.allocateIP("z"); err == nil {
		t.Fatal("a full pod network must be refused")
	}
	k.releaseIP(net.ParseIP("10.244.9.3"))
	k.releaseIP(net.ParseIP("10.244.9.5"))
	ip, err := k.allocateIP("y")
	if err != nil || ip.String() != "10.244.9.3" {
		t.Fatalf("after releases got %v, %v; want 10.244.9.3 (next free after the last one handed out)", ip, err)
	}
}

func TestWriteFilesRefusesPathsOutsideTheVolume(t *testing.T) {
	dir := t.TempDir()
	if err := writeFiles(dir, map[string][]byte{"a/b": []byte("x")}, 0o600); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "a", "b"))
	if err != nil || string(data) != "x" {
		t.Fatalf("read back %q, %v", data, err)
	}
	// "../escape" is cleaned to "escape" inside the volume; "" is refused.
	if err := writeFiles(dir, map[string][]byte{"../escape": []byte("x")}, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "escape")); err == nil {
		t.Fatal("a file was written outside the volume")
	}
	if err := writeFiles(dir, map[string][]byte{"": []byte("x")}, 0o600); err == nil {
		t.Fatal("an empty path must be refused")
	}
}

func TestBuildStatusReportsPhasesAndReadiness(t *testing.T) {
	k := testKubelet(t)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns", UID: "u1"},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "a"}, {Name: "b"}}},
	}
	w := newPodWorker(k, pod)
	if st := w.buildStatus(); st.Phase != corev1.PodPending || st.PodIP != "" {
		t.Fatalf("before the sandbox: phase %s, IP %q", st.Phase, st.PodIP)
	}
	w.sandboxReady, w.initialized, w.ip = true, true, net.ParseIP("10.244.9.2")
	for _, c := range w.containers {
		c.everStarted = true
		c.status.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}
	}
	w.containers[0].status.Ready = true
	st := w.buildStatus()
	if st.Phase != corev1.PodRunning || st.PodIP != "10.244.9.2" || conditionTrue(st, corev1.PodReady) {
		t.Fatalf("one of two ready: phase %s, IP %q, ready %v", st.Phase, st.PodIP, conditionTrue(st, corev1.PodReady))
	}
	w.containers[1].status.Ready = true
	if st := w.buildStatus(); !conditionTrue(st, corev1.PodReady) || !conditionTrue(st, corev1.ContainersReady) {
		t.Fatal("both ready: the pod must be Ready")
	}
	for i, c := range w.containers {
		c.finished = true
		c.status.Ready = false
		c.status.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: int32(i)}}
	}
	if st := w.buildStatus(); st.Phase != corev1.PodFailed {
		t.Fatalf("one container failed for good: phase %s, want Failed", st.Phase)
	}
	w.containers[1].status.State.Terminated.ExitCode = 0
	if st := w.buildStatus(); st.Phase != corev1.PodSucceeded {
		t.Fatalf("all containers exited 0 for good: phase %s, want Succeeded", st.Phase)
	}
}

func conditionTrue(st corev1.PodStatus, t corev1.PodConditionType) bool {
	for _, c := range st.Conditions {
		if c.Type == t {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
