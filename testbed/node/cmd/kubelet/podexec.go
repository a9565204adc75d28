package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
)

// podExec is `kubelet pod-exec <json podExecSpec>`, run by `ip netns exec`
// inside the pod's network namespace and a fresh (slave) mount namespace:
// it bind-mounts the volumes, gives the pod its hostname in a new UTS
// namespace and replaces itself with the container's command. It returns an
// exit code only when that fails.
func podExec(args []string) int {
	// unshare(2) of the UTS namespace applies to the calling thread only, so
	// stay on it until the exec.
	runtime.LockOSThread()
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: kubelet pod-exec '<json spec>' (run by the kubelet inside ip netns exec)")
		return 2
	}
	var spec podExecSpec
	if err := json.Unmarshal([]byte(args[0]), &spec); err != nil {
		fmt.Fprintf(os.Stderr, "pod-exec: bad spec: %v\n", err)
		return 2
	}
	if len(spec.Argv) == 0 {
		fmt.Fprintln(os.Stderr, "pod-exec: empty command")
		return 2
	}
	fail := func(format string, a ...interface{}) int {
		fmt.Fprintf(os.Stderr, "pod-exec: "+format+"\n", a...)
		return 127
	}
	if err := syscall.Unshare(syscall.CLONE_NEWUTS); err != nil {
		return fail("unshare UTS: %v", err)
	}
	if err := syscall.Sethostname([]byte(spec.Hostname)); err != nil {
		return fail("sethostname %q: %v", spec.Hostname, err)
	}
	for _, m := range spec.Mounts {
		if err := bindMount(m); err != nil {
			return fail("mount %s at %s: %v", m.Source, m.Target, err)
		}
	}
	if spec.Workdir != "" {
		if err := os.MkdirAll(spec.Workdir, 0o755); err != nil {
			return fail("workingDir %s: %v", spec.Workdir, err)
		}
		if err := os.Chdir(spec.Workdir); err != nil {
			return fail("workingDir %s: %v", spec.Workdir, err)
		}
	}
	path, err := exec.LookPath(spec.Argv[0])
	if err != nil {
		return fail("command %q: %v", spec.Argv[0], err)
	}
	err = syscall.Exec(path, spec.Argv, os.Environ())
	return fail("exec %s: %v", path, err)
}

// bindMount makes the mount point (a directory, or a file for a file
// source) and binds the source there, read-only if asked.
func bindMount(m mount) error {
	st, err := os.Stat(m.Source)
	if err != nil {
		return err
	}
	if st.IsDir() {
		if err := os.MkdirAll(m.Target, 0o755); err != nil {
			return err
		}
	} else {
		if err := os.MkdirAll(filepath.Dir(m.Target), 0o755); err != nil {
			return err
		}
		f, err := os.OpenFile(m.Target, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		f.Close()
	}
	if err := syscall.Mount(m.Source, m.Target, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return err
	}
	if m.ReadOnly {
		return syscall.Mount("", m.Target, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, "")
	}
	return nil
}
