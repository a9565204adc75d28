// Command faultproxy is an HTTPS reverse proxy in front of the test bed's API server
// that injects faults on command: refused connections, delay, 5xx answers, 409 storms
// on writes and dropped watches. Tests point the product at the kubeconfig it writes
// and switch modes through a plain-HTTP control endpoint on loopback.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"raft-elector.io/testbed/controlplane/internal/kubeconfig"
	"raft-elector.io/testbed/controlplane/internal/pki"
)

// mode is the fault applied to every request until the next change.
type mode struct {
	Name      string `json:"name"`
	DelayMS   int    `json:"delay_ms,omitempty"`
	Code      int    `json:"code,omitempty"`
	DropAfter int    `json:"drop_after_ms,omitempty"`
}

func (m mode) String() string {
	switch m.Name {
	case "slow":
		return fmt.Sprintf("slow?ms=%d", m.DelayMS)
	case "error":
		return fmt.Sprintf("error?code=%d", m.Code)
	case "dropwatch":
		return fmt.Sprintf("dropwatch?after_ms=%d", m.DropAfter)
	}
	return m.Name
}

// parseMode reads a control request: the path names the mode, the query its argument.
func parseMode(path string, q url.Values, defaultDrop time.Duration) (mode, error) {
	intArg := func(key string, lo, hi int, def int, required bool) (int, error) {
		v := q.Get(key)
		if v == "" {
			if required {
				return 0, fmt.Errorf("%s needs ?%s=N", path, key)
			}
			return def, nil
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < lo || n > hi {
			return 0, fmt.Errorf("%s: %s=%q is not an integer in %d..%d", path, key, v, lo, hi)
		}
		return n, nil
	}
	switch strings.TrimPrefix(path, "/") {
	case "pass":
		return mode{Name: "pass"}, nil
	case "down":
		return mode{Name: "down"}, nil
	case "conflict":
		return mode{Name: "conflict"}, nil
	case "slow":
		ms, err := intArg("ms", 0, 600_000, 0, true)
		return mode{Name: "slow", DelayMS: ms}, err
	case "error":
		code, err := intArg("code", 400, 599, 500, false)
		return mode{Name: "error", Code: code}, err
	case "dropwatch":
		ms, err := intArg("after_ms", 0, 600_000, int(defaultDrop/time.Millisecond), false)
		return mode{Name: "dropwatch", DropAfter: ms}, err
	}
	return mode{}, fmt.Errorf("unknown mode %q (pass, down, slow?ms=N, error?code=N, conflict, dropwatch[?after_ms=N])", path)
}

// proxy holds the listener, the current mode and the counters.
type proxy struct {
	upstream    *url.URL
	rp          *httputil.ReverseProxy
	tlsConfig   *tls.Config
	srv         *http.Server
	defaultDrop time.Duration

	mu       sync.Mutex
	mode     mode
	addr     string // fixed after the first listen, so a reopen keeps the port
	ln       net.Listener
	conns    map[net.Conn]struct{}
	watches  map[*watchStream]struct{}
	counts   map[string]map[string]int64 // mode name -> verb -> requests
	dropped  int64
	closed   int64
	answered map[int]int64 // injected status code -> count
}

type watchStream struct{ cancel context.CancelFunc }

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	fs := flag.NewFlagSet("faultproxy", flag.ContinueOnError)
	fs.SetOutput(os.Stdout)
	dir := fs.String("dir", "", "control plane directory: defaults --upstream-kubeconfig to DIR/kubeconfig and --ca-cert/--ca-key to DIR/ca.crt, DIR/ca.key")
	upstreamKC := fs.String("upstream-kubeconfig", "", "kubeconfig of the API server to forward to (its CA is trusted; its token goes into --kubeconfig-out)")
	caCert := fs.String("ca-cert", "", "CA certificate that signs the proxy's serving certificate (clients of the API server already trust it)")
	caKey := fs.String("ca-key", "", "key of --ca-cert")
	listen := fs.String("listen", "127.0.0.1:0", "HTTPS address to serve on (port 0 picks one)")
	control := fs.String("control", "127.0.0.1:0", "plain-HTTP control address (keep it on loopback)")
	sans := fs.String("extra-sans", "", "comma-separated extra IPs/DNS names for the serving certificate")
	kcOut := fs.String("kubeconfig-out", "", "write a kubeconfig pointing at the proxy with the upstream kubeconfig's credentials and CA")
	infoOut := fs.String("info-out", "", "write JSON {proxy, control, pid} here once both listeners are up")
	initial := fs.String("mode", "pass", "initial mode, as a control path with query, e.g. slow?ms=200")
	dropAfter := fs.Duration("dropwatch-after", 500*time.Millisecond, "in dropwatch mode, how long a new watch lives before it is cut (default for ?after_ms)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dir != "" {
		if *upstreamKC == "" {
			*upstreamKC = filepath.Join(*dir, "kubeconfig")
		}
		if *caCert == "" {
			*caCert = filepath.Join(*dir, "ca.crt")
		}
		if *caKey == "" {
			*caKey = filepath.Join(*dir, "ca.key")
		}
	}
	if *upstreamKC == "" || *caCert == "" || *caKey == "" {
		fmt.Println("faultproxy: need --dir, or --upstream-kubeconfig with --ca-cert and --ca-key")
		return 2
	}
	p, err := newProxy(*upstreamKC, *caCert, *caKey, *sans, *dropAfter)
	if err != nil {
		fmt.Printf("faultproxy: %v\n", err)
		return 1
	}
	path, query, _ := strings.Cut(*initial, "?")
	q, err := url.ParseQuery(query)
	if err != nil {
		fmt.Printf("faultproxy: --mode: %v\n", err)
		return 2
	}
	m, err := parseMode(path, q, *dropAfter)
	if err != nil {
		fmt.Printf("faultproxy: --mode: %v\n", err)
		return 2
	}
	p.addr = *listen
	if m.Name != "down" {
		if err := p.open(); err != nil {
			fmt.Printf("faultproxy: listen %s: %v\n", *listen, err)
			return 1
		}
	} else if p.addr, err = reservePort(*listen); err != nil {
		fmt.Printf("faultproxy: listen %s: %v\n", *listen, err)
		return 1
	}
	p.mode = m
	cl, err := net.Listen("tcp", *control)
	if err != nil {
		fmt.Printf("faultproxy: control listen %s: %v\n", *control, err)
		return 1
	}
	csrv := &http.Server{Handler: http.HandlerFunc(p.serveControl), ReadHeaderTimeout: 10 * time.Second}
	go csrv.Serve(cl)

	proxyURL := "https://" + p.addr
	controlURL := "http://" + cl.Addr().String()
	if *kcOut != "" {
		if err := kubeconfig.Retarget(*upstreamKC, *kcOut, proxyURL); err != nil {
			fmt.Printf("faultproxy: %v\n", err)
			return 1
		}
	}
	if *infoOut != "" {
		info, _ := json.Marshal(map[string]any{"proxy": proxyURL, "control": controlURL, "pid": os.Getpid()})
		if err := pki.WriteFileAtomic(*infoOut, append(info, '\n'), 0o644); err != nil {
			fmt.Printf("faultproxy: %v\n", err)
			return 1
		}
	}
	fmt.Printf("faultproxy: proxy %s -> %s, control %s, mode %s\n", proxyURL, p.upstream, controlURL, m)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	sig := <-sigs
	fmt.Printf("faultproxy: %s: stopping\n", sig)
	csrv.Close()
	p.srv.Close()
	p.mu.Lock()
	p.closeLocked()
	p.mu.Unlock()
	return 0
}

func newProxy(upstreamKC, caCert, caKey, sans string, dropAfter time.Duration) (*proxy, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", upstreamKC)
	if err != nil {
		return nil, fmt.Errorf("upstream kubeconfig %s: %w", upstreamKC, err)
	}
	upstream, err := url.Parse(cfg.Host)
	if err != nil {
		return nil, fmt.Errorf("upstream server %q: %w", cfg.Host, err)
	}
	// Only the CA (and any client certificate) of the upstream kubeconfig is used to
	// dial: each client's own Authorization header is forwarded unchanged.
	upTLS, err := rest.TLSConfigFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("upstream TLS: %w", err)
	}
	transport := &http.Transport{
		Proxy:               nil,
		TLSClientConfig:     upTLS,
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
	}
	ca, err := pki.LoadCA(caCert, caKey)
	if err != nil {
		return nil, fmt.Errorf("CA: %w", err)
	}
	ips := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	dns := []string{"localhost"}
	for _, s := range strings.Split(sans, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		} else if ip := net.ParseIP(s); ip != nil {
			ips = append(ips, ip)
		} else {
			dns = append(dns, s)
		}
	}
	certPEM, keyPEM, err := ca.IssueServingPEM("faultproxy", dns, ips)
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	p := &proxy{
		upstream:    upstream,
		tlsConfig:   &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}},
		defaultDrop: dropAfter,
		conns:       map[net.Conn]struct{}{},
		watches:     map[*watchStream]struct{}{},
		counts:      map[string]map[string]int64{},
		answered:    map[int]int64{},
	}
	p.rp = &httputil.ReverseProxy{
		Rewrite:       func(r *httputil.ProxyRequest) { r.SetURL(upstream) },
		Transport:     transport,
		FlushInterval: -1, // watches stream event by event
		ErrorLog:      nil,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			writeStatus(w, http.StatusBadGateway, "faultproxy: upstream: "+err.Error())
		},
	}
	p.srv = &http.Server{
		Handler:           p,
		ReadHeaderTimeout: 30 * time.Second,
		ConnState:         p.trackConn,
	}
	return p, nil
}

// reservePort resolves a ":0" listen address to a concrete one without serving it, so
// a proxy started in mode down still has a fixed address to report.
func reservePort(addr string) (string, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// open starts serving on p.addr; called at start and when leaving mode down.
func (p *proxy) open() error {
	l, err := net.Listen("tcp", p.addr)
	if err != nil {
		return err
	}
	p.addr = l.Addr().String()
	p.ln = l
	go p.srv.Serve(tls.NewListener(l, p.tlsConfig))
	return nil
}

// closeLocked stops accepting (new connections are refused by the kernel) and closes
// every open client connection.
func (p *proxy) closeLocked() {
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
		p.closed++
	}
	p.conns = map[net.Conn]struct{}{}
}

func (p *proxy) trackConn(c net.Conn, state http.ConnState) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch state {
	case http.StateNew:
		if p.mode.Name == "down" {
			c.Close()
			p.closed++
			return
		}
		p.conns[c] = struct{}{}
	case http.StateClosed, http.StateHijacked:
		delete(p.conns, c)
	}
}

func (p *proxy) setMode(m mode) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	prev := p.mode
	if m.Name == "down" {
		p.closeLocked()
	} else if p.ln == nil {
		if err := p.open(); err != nil {
			return fmt.Errorf("reopen %s: %w", p.addr, err)
		}
	}
	p.mode = m
	if m.Name == "dropwatch" {
		for w := range p.watches {
			w.cancel()
			p.dropped++
		}
	}
	fmt.Printf("faultproxy: mode %s -> %s\n", prev, m)
	return nil
}

// verbOf names a request the way the stats report it: the HTTP method, or WATCH.
func verbOf(r *http.Request) string {
	if r.Method == http.MethodGet && isWatch(r) {
		return "WATCH"
	}
	return r.Method
}

func isWatch(r *http.Request) bool {
	w := r.URL.Query().Get("watch")
	return w == "true" || w == "1" || strings.Contains(r.URL.Path, "/watch/")
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	verb := verbOf(r)
	p.mu.Lock()
	m := p.mode
	byVerb := p.counts[m.Name]
	if byVerb == nil {
		byVerb = map[string]int64{}
		p.counts[m.Name] = byVerb
	}
	byVerb[verb]++
	p.mu.Unlock()

	switch m.Name {
	case "down":
		// Accepted just before the listener closed: drop it like a dead server.
		panic(http.ErrAbortHandler)
	case "error":
		p.inject(w, m.Code, fmt.Sprintf("faultproxy: injected %d", m.Code))
		return
	case "conflict":
		switch r.Method {
		case http.MethodPost, http.MethodPut, http.MethodPatch:
			p.inject(w, http.StatusConflict, "faultproxy: injected conflict: the object has been modified; please apply your changes to the latest version and try again")
			return
		}
	case "slow":
		select {
		case <-time.After(time.Duration(m.DelayMS) * time.Millisecond):
		case <-r.Context().Done():
			return
		}
	}
	if verb == "WATCH" {
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		ws := &watchStream{cancel: cancel}
		p.mu.Lock()
		p.watches[ws] = struct{}{}
		if p.mode.Name == "dropwatch" {
			after := time.Duration(p.mode.DropAfter) * time.Millisecond
			time.AfterFunc(after, func() {
				p.mu.Lock()
				defer p.mu.Unlock()
				// A watch opened in dropwatch mode survives a switch back to pass.
				if _, live := p.watches[ws]; live && p.mode.Name == "dropwatch" {
					p.dropped++
					cancel()
				}
			})
		}
		p.mu.Unlock()
		defer func() {
			p.mu.Lock()
			delete(p.watches, ws)
			p.mu.Unlock()
		}()
		r = r.WithContext(ctx)
	}
	p.rp.ServeHTTP(w, r)
}

func (p *proxy) inject(w http.ResponseWriter, code int, msg string) {
	p.mu.Lock()
	p.answered[code]++
	p.mu.Unlock()
	writeStatus(w, code, msg)
}

// writeStatus answers with a metav1.Status body, which is what Kubernetes clients parse.
func writeStatus(w http.ResponseWriter, code int, msg string) {
	reason := map[int]string{
		400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
		405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 422: "Invalid",
		429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
	}[code]
	body, _ := json.Marshal(map[string]any{
		"kind": "Status", "apiVersion": "v1", "metadata": map[string]any{},
		"status": "Failure", "message": msg, "reason": reason, "code": code,
	})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(body)
}

// stats is the JSON served at GET /stats.
type stats struct {
	Mode              string                      `json:"mode"`
	Requests          map[string]map[string]int64 `json:"requests"`
	Total             int64                       `json:"total"`
	Injected          map[string]int64            `json:"injected"`
	WatchesOpen       int                         `json:"watches_open"`
	WatchesDropped    int64                       `json:"watches_dropped"`
	ConnectionsClosed int64                       `json:"connections_closed"`
}

func (p *proxy) snapshot() stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := stats{
		Mode: p.mode.String(), Requests: map[string]map[string]int64{}, Injected: map[string]int64{},
		WatchesOpen: len(p.watches), WatchesDropped: p.dropped, ConnectionsClosed: p.closed,
	}
	for m, byVerb := range p.counts {
		c := map[string]int64{}
		for v, n := range byVerb {
			c[v] = n
			s.Total += n
		}
		s.Requests[m] = c
	}
	codes := make([]int, 0, len(p.answered))
	for c := range p.answered {
		codes = append(codes, c)
	}
	sort.Ints(codes)
	for _, c := range codes {
		s.Injected[strconv.Itoa(c)] = p.answered[c]
	}
	return s
}

func (p *proxy) serveControl(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	if r.Method != http.MethodGet && r.Method != http.MethodPost && r.Method != http.MethodPut {
		w.WriteHeader(http.StatusMethodNotAllowed)
		fmt.Fprintln(w, `{"error":"use GET or POST"}`)
		return
	}
	switch r.URL.Path {
	case "/stats", "/mode":
		json.NewEncoder(w).Encode(p.snapshot())
		return
	case "/reset":
		p.mu.Lock()
		p.counts = map[string]map[string]int64{}
		p.answered = map[int]int64{}
		p.dropped, p.closed = 0, 0
		p.mu.Unlock()
		json.NewEncoder(w).Encode(p.snapshot())
		return
	}
	m, err := parseMode(r.URL.Path, r.URL.Query(), p.defaultDrop)
	if err == nil {
		err = p.setMode(m)
	}
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
		return
	}
	json.NewEncoder(w).Encode(map[string]string{"mode": m.String()})
}
