// Command controlplane runs a real Kubernetes control plane in one process for tests:
// embedded etcd, kube-apiserver with RBAC and static tokens, and (with
// --components=all) kube-controller-manager and kube-scheduler. It writes an admin
// kubeconfig and a ready marker into --dir; see ../../README.md for the interface.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"raft-elector.io/testbed/controlplane/internal/kubeconfig"
	"raft-elector.io/testbed/controlplane/internal/pki"
)

// settings are the command-line flags after validation.
type settings struct {
	dir             string
	components      string
	bindAddress     net.IP
	advertise       net.IP
	securePort      int
	etcdPort        int
	serviceCIDR     string
	extraSANs       []string
	verbosity       int
	unsafeNoFsync   bool
	readyTimeout    time.Duration
	shutdownTimeout time.Duration
}

// paths names every file the program keeps in --dir.
type paths struct {
	dir, log, etcdLog, etcdData, ready, pid, env       string
	caCrt, caKey, servingCrt, servingKey, saKey, saPub string
	tokens, adminToken, userToken                      string
	kubeconfig, userKubeconfig, flexVolume             string
}

func newPaths(dir string) paths {
	j := func(name string) string { return filepath.Join(dir, name) }
	return paths{
		dir: dir, log: j("controlplane.log"), etcdLog: j("etcd.log"), etcdData: j("etcd"),
		ready: j("ready"), pid: j("controlplane.pid"), env: j("apiserver.env"),
		caCrt: j("ca.crt"), caKey: j("ca.key"), servingCrt: j("apiserver.crt"), servingKey: j("apiserver.key"),
		saKey: j("sa.key"), saPub: j("sa.pub"),
		tokens: j("tokens.csv"), adminToken: j("admin.token"), userToken: j("user.token"),
		kubeconfig: j("kubeconfig"), userKubeconfig: j("user.kubeconfig"), flexVolume: j("flexvolume"),
	}
}

func main() {
	s, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stdout, "controlplane: %v\n", err)
		os.Exit(2)
	}
	os.Exit(run(s))
}

func parseFlags(args []string) (settings, error) {
	fs := flag.NewFlagSet("controlplane", flag.ContinueOnError)
	fs.SetOutput(os.Stdout)
	dir := fs.String("dir", "", "data directory: etcd data, certificates, tokens, kubeconfig, logs, ready marker (required)")
	components := fs.String("components", "all", "apiserver (etcd + kube-apiserver) or all (also kube-controller-manager and kube-scheduler)")
	bind := fs.String("bind-address", "127.0.0.1", "address the API server listens on (0.0.0.0 for every interface)")
	advertise := fs.String("advertise-address", "", "address the API server advertises and pods dial; default: --bind-address, or 127.0.0.1 when that is unspecified")
	port := fs.Int("secure-port", 0, "API server port; 0 picks a free port (written to kubeconfig and apiserver.env)")
	etcdPort := fs.Int("etcd-port", 0, "etcd client port (peer port is chosen separately); 0 picks a free port")
	serviceCIDR := fs.String("service-cluster-ip-range", "10.96.0.0/24", "ClusterIP range")
	sans := fs.String("extra-sans", "", "comma-separated extra IPs/DNS names for the serving certificate")
	verbosity := fs.Int("v", 0, "klog verbosity of the Kubernetes components (their log goes to DIR/controlplane.log)")
	noFsync := fs.Bool("etcd-unsafe-no-fsync", false, "disable fsync in etcd (faster writes, data lost on a host crash)")
	readyTimeout := fs.Duration("ready-timeout", 120*time.Second, "give up (exit 1) when not ready within this time")
	shutdownTimeout := fs.Duration("shutdown-timeout", 8*time.Second, "bound on each shutdown step (components, API server, etcd)")
	if err := fs.Parse(args); err != nil {
		return settings{}, err
	}
	if fs.NArg() > 0 {
		return settings{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *dir == "" {
		return settings{}, errors.New("--dir is required")
	}
	if *components != "apiserver" && *components != "all" {
		return settings{}, fmt.Errorf("--components must be apiserver or all, not %q", *components)
	}
	bindIP := net.ParseIP(*bind)
	if bindIP == nil {
		return settings{}, fmt.Errorf("--bind-address %q is not an IP address", *bind)
	}
	var advIP net.IP
	switch {
	case *advertise != "":
		if advIP = net.ParseIP(*advertise); advIP == nil || advIP.IsUnspecified() {
			return settings{}, fmt.Errorf("--advertise-address %q is not a usable IP address", *advertise)
		}
	case bindIP.IsUnspecified():
		advIP = net.IPv4(127, 0, 0, 1)
	default:
		advIP = bindIP
	}
	if *port < 0 || *port > 65535 || *etcdPort < 0 || *etcdPort > 65534 {
		return settings{}, errors.New("ports must be in 0..65535")
	}
	if _, _, err := net.ParseCIDR(*serviceCIDR); err != nil {
		return settings{}, fmt.Errorf("--service-cluster-ip-range: %w", err)
	}
	var extra []string
	for _, s := range strings.Split(*sans, ",") {
		if s = strings.TrimSpace(s); s != "" {
			extra = append(extra, s)
		}
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return settings{}, err
	}
	return settings{
		dir: abs, components: *components, bindAddress: bindIP, advertise: advIP,
		securePort: *port, etcdPort: *etcdPort, serviceCIDR: *serviceCIDR, extraSANs: extra,
		verbosity: *verbosity, unsafeNoFsync: *noFsync, readyTimeout: *readyTimeout,
		shutdownTimeout: *shutdownTimeout,
	}, nil
}

// say prints a progress line on stdout; the components' own logs go to the log file.
func say(format string, args ...any) {
	fmt.Fprintf(os.Stdout, "controlplane: "+format+"\n", args...)
}

func run(s settings) int {
	p := newPaths(s.dir)
	if err := os.MkdirAll(p.dir, 0o755); err != nil {
		say("create %s: %v", p.dir, err)
		return 1
	}
	// Two control planes on one directory would fight over etcd's data files.
	if pid, alive := runningPid(p.pid); alive {
		say("%s is in use by running controlplane pid %d", p.dir, pid)
		return 1
	}
	// A marker from an earlier run must not announce this one.
	if err := os.Remove(p.ready); err != nil && !errors.Is(err, os.ErrNotExist) {
		say("remove stale %s: %v", p.ready, err)
		return 1
	}
	logFile, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		say("open log: %v", err)
		return 1
	}
	// Kubernetes components log through klog to stderr, and a panic's trace goes there
	// too: point file descriptor 2 at the log file so the terminal stays readable.
	if err := syscall.Dup3(int(logFile.Fd()), 2, 0); err != nil {
		say("redirect stderr to %s: %v", p.log, err)
		return 1
	}
	start := time.Now()
	if err := pki.WriteFileAtomic(p.pid, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		say("write pid file: %v", err)
		return 1
	}
	defer os.Remove(p.pid)

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	cp, err := prepare(s, p)
	if err != nil {
		say("%v", err)
		return 1
	}
	code := cp.runUntilSignal(sigs, start)
	os.Remove(p.ready)
	return code
}

// controlPlane holds what a run needs after the files are written.
type controlPlane struct {
	s          settings
	p          paths
	server     string // URL this host uses
	adminToken string
	caPool     *x509.CertPool
	etcdURL    string
	etcdPeer   string
}

// prepare chooses ports and writes certificates, keys, tokens and kubeconfigs.
func prepare(s settings, p paths) (*controlPlane, error) {
	// The address this host dials: the bind address unless that is loopback or "any".
	localHost := s.bindAddress.String()
	if s.bindAddress.IsLoopback() || s.bindAddress.IsUnspecified() {
		localHost = "127.0.0.1"
	}
	var err error
	if s.securePort == 0 {
		if s.securePort, err = freePort(s.bindAddress.String()); err != nil {
			return nil, fmt.Errorf("pick API server port: %w", err)
		}
	}
	etcdPort := s.etcdPort
	if etcdPort == 0 {
		if etcdPort, err = freePort("127.0.0.1"); err != nil {
			return nil, fmt.Errorf("pick etcd port: %w", err)
		}
	}
	peerPort, err := freePort("127.0.0.1")
	if err != nil {
		return nil, fmt.Errorf("pick etcd peer port: %w", err)
	}
	for peerPort == etcdPort {
		if peerPort, err = freePort("127.0.0.1"); err != nil {
			return nil, fmt.Errorf("pick etcd peer port: %w", err)
		}
	}

	ca, err := pki.LoadOrCreateCA(p.caCrt, p.caKey)
	if err != nil {
		return nil, fmt.Errorf("certificate authority: %w", err)
	}
	ips := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, s.advertise}
	if !s.bindAddress.IsUnspecified() {
		ips = append(ips, s.bindAddress)
	}
	if svc, err := firstServiceIP(s.serviceCIDR); err == nil {
		ips = append(ips, svc)
	}
	dns := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	for _, san := range s.extraSANs {
		if ip := net.ParseIP(san); ip != nil {
			ips = append(ips, ip)
		} else {
			dns = append(dns, san)
		}
	}
	if err := ca.IssueServing("kube-apiserver", dns, ips, p.servingCrt, p.servingKey); err != nil {
		return nil, err
	}
	if err := pki.LoadOrCreateRSAKey(p.saKey, p.saPub); err != nil {
		return nil, err
	}
	admin, err := pki.LoadOrCreateToken(p.adminToken)
	if err != nil {
		return nil, fmt.Errorf("admin token: %w", err)
	}
	user, err := pki.LoadOrCreateToken(p.userToken)
	if err != nil {
		return nil, fmt.Errorf("user token: %w", err)
	}
	// token,user,uid,"groups": the admin is in system:masters, the user in no group,
	// so RBAC grants it only what system:authenticated gets (discovery).
	csv := fmt.Sprintf("%s,admin,admin,\"system:masters\"\n%s,testbed-user,testbed-user\n", admin, user)
	if err := pki.WriteFileAtomic(p.tokens, []byte(csv), 0o600); err != nil {
		return nil, err
	}
	server := "https://" + net.JoinHostPort(localHost, strconv.Itoa(s.securePort))
	adminUser := kubeconfig.User{Context: "testbed", Name: "admin", Token: admin}
	plainUser := kubeconfig.User{Context: "testbed-user", Name: "testbed-user", Token: user}
	if err := kubeconfig.Write(p.kubeconfig, "testbed", server, ca.CertPEM, adminUser, plainUser); err != nil {
		return nil, err
	}
	if err := kubeconfig.Write(p.userKubeconfig, "testbed", server, ca.CertPEM, plainUser); err != nil {
		return nil, err
	}
	env := fmt.Sprintf("SERVER=%s\nKUBERNETES_SERVICE_HOST=%s\nKUBERNETES_SERVICE_PORT=%d\nKUBECONFIG=%s\n",
		server, s.advertise, s.securePort, p.kubeconfig)
	if err := pki.WriteFileAtomic(p.env, []byte(env), 0o644); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(p.flexVolume, 0o755); err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return &controlPlane{
		s: s, p: p, server: server, adminToken: admin, caPool: pool,
		etcdURL:  "http://127.0.0.1:" + strconv.Itoa(etcdPort),
		etcdPeer: "http://127.0.0.1:" + strconv.Itoa(peerPort),
	}, nil
}

// runUntilSignal starts everything, announces readiness and shuts down in order.
func (cp *controlPlane) runUntilSignal(sigs <-chan os.Signal, start time.Time) int {
	etcd, err := startEtcd(cp)
	if err != nil {
		say("etcd: %v", err)
		return 1
	}
	say("etcd serving on %s after %s", cp.etcdURL, time.Since(start).Round(time.Millisecond))
	stopEtcd := func() {
		done := make(chan struct{})
		go func() { etcd.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(cp.s.shutdownTimeout):
			say("etcd did not stop within %s", cp.s.shutdownTimeout)
		}
	}

	apiCtx, stopAPI := context.WithCancel(context.Background())
	defer stopAPI()
	apiDone := make(chan error, 1)
	if err := startAPIServer(apiCtx, cp, apiDone); err != nil {
		say("kube-apiserver: %v", err)
		stopEtcd()
		return 1
	}

	compCtx, stopComponents := context.WithCancel(context.Background())
	defer stopComponents()
	compDone := make(chan componentExit, 2)
	running := 0

	readyCtx, readyCancel := context.WithTimeout(context.Background(), cp.s.readyTimeout)
	defer readyCancel()
	readyErr := make(chan error, 1)
	go func() {
		if err := cp.waitOK(readyCtx, "/readyz"); err != nil {
			readyErr <- err
			return
		}
		readyErr <- nil
	}()

	shutdown := func(code int) int {
		readyCancel()
		os.Remove(cp.p.ready)
		if running > 0 {
			stopComponents()
			deadline := time.After(cp.s.shutdownTimeout)
		wait:
			for running > 0 {
				select {
				case <-compDone:
					running--
				case <-deadline:
					say("%d component(s) did not stop within %s", running, cp.s.shutdownTimeout)
					break wait
				}
			}
		}
		stopAPI()
		select {
		case <-apiDone:
		case <-time.After(cp.s.shutdownTimeout):
			say("kube-apiserver did not finish draining within %s", cp.s.shutdownTimeout)
		}
		stopEtcd()
		say("stopped")
		return code
	}

	phase := "apiserver"
	for {
		select {
		case sig := <-sigs:
			say("%s: shutting down", sig)
			go func() {
				<-sigs
				say("second signal: exiting at once")
				os.Exit(1)
			}()
			return shutdown(0)
		case err := <-apiDone:
			say("kube-apiserver exited: %v (see %s)", err, cp.p.log)
			apiDone <- err
			return shutdown(1)
		case c := <-compDone:
			running--
			say("%s exited: %v (see %s)", c.name, c.err, cp.p.log)
			return shutdown(1)
		case err := <-etcd.Err():
			say("etcd failed: %v (see %s)", err, cp.p.etcdLog)
			return shutdown(1)
		case err := <-readyErr:
			if err != nil {
				say("not ready after %s (%s): %v (see %s)", cp.s.readyTimeout, phase, err, cp.p.log)
				return shutdown(1)
			}
			switch phase {
			case "apiserver":
				say("kube-apiserver ready at %s after %s", cp.server, time.Since(start).Round(time.Millisecond))
				if cp.s.components == "all" {
					if err := startControllerManager(compCtx, cp, compDone); err != nil {
						say("kube-controller-manager: %v", err)
						return shutdown(1)
					}
					running++
					if err := startScheduler(compCtx, cp, compDone); err != nil {
						say("kube-scheduler: %v", err)
						return shutdown(1)
					}
					running++
				}
				phase = "objects"
				go func() {
					err := cp.waitOK(readyCtx, "/api/v1/namespaces/default")
					if err == nil && cp.s.components == "all" {
						err = cp.waitOK(readyCtx, "/api/v1/namespaces/default/serviceaccounts/default")
					}
					readyErr <- err
				}()
			case "objects":
				phase = "ready"
				marker := fmt.Sprintf("server=%s\npid=%d\ncomponents=%s\n", cp.server, os.Getpid(), cp.s.components)
				if err := pki.WriteFileAtomic(cp.p.ready, []byte(marker), 0o644); err != nil {
					say("write %s: %v", cp.p.ready, err)
					return shutdown(1)
				}
				say("ready (%s) at %s after %s; kubeconfig %s", cp.s.components, cp.server,
					time.Since(start).Round(time.Millisecond), cp.p.kubeconfig)
			}
		}
	}
}

// waitOK polls path on the API server with the admin token until it answers 200.
func (cp *controlPlane) waitOK(ctx context.Context, path string) error {
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: cp.caPool}},
	}
	defer client.CloseIdleConnections()
	var last error
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, cp.server+path, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+cp.adminToken)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("GET %s: %s", path, resp.Status)
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// runningPid reports the pid in pidFile when that process is alive and is this program.
func runningPid(pidFile string) (int, bool) {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 || pid == os.Getpid() {
		return 0, false
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return 0, false
	}
	self, err := os.Executable()
	if err != nil {
		return 0, false
	}
	return pid, filepath.Base(exe) == filepath.Base(self)
}

func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// firstServiceIP is the ClusterIP the apiserver gives the `kubernetes` Service.
func firstServiceIP(cidr string) (net.IP, error) {
	_, n, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, err
	}
	ip := n.IP.To4()
	if ip == nil {
		ip = append(net.IP(nil), n.IP...)
	} else {
		ip = append(net.IP(nil), ip...)
	}
	ip[len(ip)-1]++
	return ip, nil
}
