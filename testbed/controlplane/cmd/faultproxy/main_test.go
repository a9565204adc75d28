package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"raft-elector.io/testbed/controlplane/internal/kubeconfig"
	"raft-elector.io/testbed/controlplane/internal/pki"
)

const token = "t0k"

// bed is an upstream that behaves like the API server for the parts the proxy cares
// about (auth header, watches that stream until cancelled, writes), and a proxy in
// front of it.
type bed struct {
	p      *proxy
	url    string
	caPool *x509.CertPool
}

func newBed(t *testing.T) *bed {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.LoadOrCreateCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.IssueServingPEM("upstream", nil, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+token {
			http.Error(w, "no token", http.StatusUnauthorized)
			return
		}
		if r.URL.Query().Get("watch") == "1" {
			for i := 0; ; i++ {
				if _, err := fmt.Fprintf(w, "event %d\n", i); err != nil {
					return
				}
				w.(http.Flusher).Flush()
				select {
				case <-r.Context().Done():
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
		}
		fmt.Fprintf(w, "%s ok", r.Method)
	}))
	up.EnableHTTP2 = true
	up.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	up.StartTLS()
	t.Cleanup(up.Close)

	kc := filepath.Join(dir, "kubeconfig")
	if err := kubeconfig.Write(kc, "up", up.URL, ca.CertPEM, kubeconfig.User{Context: "c", Name: "u", Token: token}); err != nil {
		t.Fatal(err)
	}
	p, err := newProxy(kc, filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"), "", 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	p.addr = "127.0.0.1:0"
	p.mode = mode{Name: "pass"}
	if err := p.open(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.srv.Close()
		p.mu.Lock()
		p.closeLocked()
		p.mu.Unlock()
	})
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	// The kubeconfig the proxy writes points at it with the same token and CA.
	out := filepath.Join(dir, "proxy.kubeconfig")
	if err := kubeconfig.Retarget(kc, out, "https://"+p.addr); err != nil {
		t.Fatal(err)
	}
	return &bed{p: p, url: "https://" + p.addr, caPool: pool}
}

func (b *bed) client(h2 bool) *http.Client {
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: b.caPool}, ForceAttemptHTTP2: h2}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func (b *bed) do(t *testing.T, c *http.Client, method, path string) (int, string, error) {
	t.Helper()
	req, err := http.NewRequest(method, b.url+path, strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

func (b *bed) set(t *testing.T, path string) {
	t.Helper()
	rec := httptest.NewRecorder()
	b.p.serveControl(rec, httptest.NewRequest(http.MethodPost, path, nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("control %s: %d %s", path, rec.Code, rec.Body)
	}
}

func TestPassForwardsTheClientsOwnTokenOverHTTP1AndHTTP2(t *testing.T) {
	b := newBed(t)
	for _, h2 := range []bool{false, true} {
		code, body, err := b.do(t, b.client(h2), http.MethodGet, "/api")
		if err != nil || code != 200 || body != "GET ok" {
			t.Fatalf("h2=%v: %d %q %v", h2, code, body, err)
		}
	}
	req, _ := http.NewRequest(http.MethodGet, b.url+"/api", nil)
	resp, err := b.client(false).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("a request without a token got %d; the proxy must not add credentials", resp.StatusCode)
	}
}

func TestDownRefusesNewConnectionsClosesOpenOnesAndPassReopensThePort(t *testing.T) {
	b := newBed(t)
	c := b.client(false)
	if code, _, err := b.do(t, c, http.MethodGet, "/api"); err != nil || code != 200 {
		t.Fatalf("before down: %d %v", code, err)
	}
	// Hold a raw keep-alive connection open across the switch.
	raw, err := tls.Dial("tcp", b.p.addr, &tls.Config{RootCAs: b.caPool, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	fmt.Fprintf(raw, "GET /api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", token)
	br := bufio.NewReader(raw)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()

	b.set(t, "/down")
	raw.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := br.ReadByte(); err == nil || errors.Is(err, syscall.ETIMEDOUT) || isTimeout(err) {
		t.Fatalf("open connection not closed by down: %v", err)
	}
	_, err = net.DialTimeout("tcp", b.p.addr, time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial in down mode: %v, want connection refused", err)
	}
	if _, _, err := b.do(t, c, http.MethodGet, "/api"); err == nil {
		t.Fatal("request succeeded in down mode")
	}
	b.set(t, "/pass")
	if code, _, err := b.do(t, c, http.MethodGet, "/api"); err != nil || code != 200 {
		t.Fatalf("after pass: %d %v", code, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestErrorConflictAndSlowModes(t *testing.T) {
	b := newBed(t)
	c := b.client(true)

	b.set(t, "/error?code=503")
	code, body, err := b.do(t, c, http.MethodGet, "/api/v1/pods")
	if err != nil || code != 503 {
		t.Fatalf("error mode: %d %v", code, err)
	}
	var st struct {
		Kind, Reason string
		Code         int
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil || st.Kind != "Status" || st.Reason != "ServiceUnavailable" || st.Code != 503 {
		t.Fatalf("error body is not a metav1.Status: %q", body)
	}

	b.set(t, "/conflict")
	for _, m := range []string{http.MethodPost, http.MethodPut, http.MethodPatch} {
		if code, body, _ := b.do(t, c, m, "/api/v1/namespaces/x/pods/p"); code != 409 || !strings.Contains(body, `"reason":"Conflict"`) {
			t.Fatalf("conflict mode %s: %d %q", m, code, body)
		}
	}
	for _, m := range []string{http.MethodGet, http.MethodDelete} {
		if code, _, _ := b.do(t, c, m, "/api/v1/namespaces/x/pods/p"); code != 200 {
			t.Fatalf("conflict mode %s: %d, want it forwarded", m, code)
		}
	}

	b.set(t, "/slow?ms=150")
	start := time.Now()
	if code, _, err := b.do(t, c, http.MethodGet, "/api"); err != nil || code != 200 {
		t.Fatalf("slow mode: %d %v", code, err)
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("slow?ms=150 answered in %s", d)
	}

	s := b.p.snapshot()
	if s.Requests["conflict"]["PATCH"] != 1 || s.Requests["conflict"]["GET"] != 1 || s.Requests["slow"]["GET"] != 1 ||
		s.Injected["409"] != 3 || s.Injected["503"] != 1 {
		t.Fatalf("stats: %+v", s)
	}
}

// readWatch reads lines until the stream ends; it returns how many it got and why it ended.
func readWatch(t *testing.T, b *bed, c *http.Client, first chan<- struct{}) (int, error) {
	req, _ := http.NewRequest(http.MethodGet, b.url+"/api/v1/pods?watch=1", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	n := 0
	for sc.Scan() {
		n++
		if n == 1 && first != nil {
			close(first)
		}
	}
	return n, sc.Err()
}

func TestDropwatchCutsOpenWatchesAtOnceAndNewOnesAfterTheDelay(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			b := newBed(t)
			c := b.client(h2)
			first := make(chan struct{})
			ended := make(chan time.Time, 1)
			go func() {
				readWatch(t, b, c, first)
				ended <- time.Now()
			}()
			select {
			case <-first:
			case <-time.After(5 * time.Second):
				t.Fatal("watch through the proxy delivered nothing")
			}
			switched := time.Now()
			b.set(t, "/dropwatch?after_ms=300")
			select {
			case at := <-ended:
				if d := at.Sub(switched); d > time.Second {
					t.Fatalf("open watch ended %s after dropwatch", d)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("open watch not dropped")
			}

			start := time.Now()
			n, _ := readWatch(t, b, c, nil)
			d := time.Since(start)
			if d < 250*time.Millisecond || d > 3*time.Second || n < 2 {
				t.Fatalf("new watch lasted %s with %d events, want about 300 ms", d, n)
			}
			if code, _, err := b.do(t, c, http.MethodGet, "/api"); err != nil || code != 200 {
				t.Fatalf("GET in dropwatch mode: %d %v", code, err)
			}

			// Back to pass: a watch opened now lives on.
			b.set(t, "/pass")
			done := make(chan struct{})
			go func() { readWatch(t, b, c, nil); close(done) }()
			select {
			case <-done:
				t.Fatal("watch ended in pass mode")
			case <-time.After(600 * time.Millisecond):
			}
			if s := b.p.snapshot(); s.WatchesDropped != 2 || s.WatchesOpen != 1 {
				t.Fatalf("stats: %+v", s)
			}
		})
	}
}

func TestBadControlRequestsAreRejectedAndLeaveTheModeUnchanged(t *testing.T) {
	b := newBed(t)
	b.set(t, "/conflict")
	for _, path := range []string{"/slow", "/slow?ms=abc", "/slow?ms=-1", "/error?code=200", "/error?code=x", "/dropwatch?after_ms=1e9", "/nonsense"} {
		rec := httptest.NewRecorder()
		b.p.serveControl(rec, httptest.NewRequest(http.MethodPost, path, nil))
		if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "error") {
			t.Fatalf("%s: %d %s", path, rec.Code, rec.Body)
		}
	}
	rec := httptest.NewRecorder()
	b.p.serveControl(rec, httptest.NewRequest(http.MethodDelete, "/pass", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Fatalf("DELETE /pass: %d", rec.Code)
	}
	if m := b.p.snapshot().Mode; m != "conflict" {
		t.Fatalf("mode changed to %q by bad requests", m)
	}
}
