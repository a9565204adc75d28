package main

import (
	"context"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

// defaultTokenSeconds is the lifetime asked for a projected ServiceAccount
// token when the volume gives none (the API server's default).
const defaultTokenSeconds = 3607

// mount is one bind mount pod-exec makes inside the container's mount
// namespace.
type mount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly"`
}

// volumeDir is where volume name of the pod lives on the host.
func (w *podWorker) volumeDir(name string) string {
	return filepath.Join(w.dir, "volumes", name)
}

// prepareVolumes materialises every volume of the pod under its directory:
// emptyDir as an empty directory, secret/configMap/downwardAPI/projected as
// files written from the API, hostPath as itself. Tokens are TokenRequests
// bound to the pod; refreshTokens rewrites them before they expire.
func (w *podWorker) prepareVolumes(ctx context.Context, pod *corev1.Pod) error {
	for _, v := range pod.Spec.Volumes {
		dir := w.volumeDir(v.Name)
		if err := os.MkdirAll(dir, 0o777); err != nil {
			return fmt.Errorf("volume %s: %w", v.Name, err)
		}
		if err := w.fillVolume(ctx, pod, v, dir); err != nil {
			return fmt.Errorf("volume %s: %w", v.Name, err)
		}
	}
	return nil
}

// fillVolume writes the files of one volume into dir.
func (w *podWorker) fillVolume(ctx context.Context, pod *corev1.Pod, v corev1.Volume, dir string) error {
	switch {
	case v.EmptyDir != nil, v.HostPath != nil:
		return nil
	case v.Secret != nil:
		files, err := w.secretFiles(ctx, pod.Namespace, v.Secret.SecretName, v.Secret.Items, ptr.Deref(v.Secret.Optional, false))
		if err != nil {
			return err
		}
		return writeFiles(dir, files, mode(v.Secret.DefaultMode))
	case v.ConfigMap != nil:
		files, err := w.configMapFiles(ctx, pod.Namespace, v.ConfigMap.Name, v.ConfigMap.Items, ptr.Deref(v.ConfigMap.Optional, false))
		if err != nil {
			return err
		}
		return writeFiles(dir, files, mode(v.ConfigMap.DefaultMode))
	case v.DownwardAPI != nil:
		files, err := w.downwardFiles(pod, v.DownwardAPI.Items)
		if err != nil {
			return err
		}
		return writeFiles(dir, files, mode(v.DownwardAPI.DefaultMode))
	case v.Projected != nil:
		files := map[string][]byte{}
		for _, src := range v.Projected.Sources {
			var part map[string][]byte
			var err error
			switch {
			case src.Secret != nil:
				part, err = w.secretFiles(ctx, pod.Namespace, src.Secret.Name, src.Secret.Items, ptr.Deref(src.Secret.Optional, false))
			case src.ConfigMap != nil:
				part, err = w.configMapFiles(ctx, pod.Namespace, src.ConfigMap.Name, src.ConfigMap.Items, ptr.Deref(src.ConfigMap.Optional, false))
			case src.DownwardAPI != nil:
				part, err = w.downwardFiles(pod, src.DownwardAPI.Items)
			case src.ServiceAccountToken != nil:
				var token string
				token, err = w.requestToken(ctx, pod, src.ServiceAccountToken)
				part = map[string][]byte{src.ServiceAccountToken.Path: []byte(token)}
			default:
				err = fmt.Errorf("unsupported projected source (the test bed knows secret, configMap, downwardAPI, serviceAccountToken)")
			}
			if err != nil {
				return err
			}
			for k, v := range part {
				files[k] = v
			}
		}
		return writeFiles(dir, files, mode(v.Projected.DefaultMode))
	default:
		return fmt.Errorf("unsupported volume type (the test bed knows emptyDir, hostPath, secret, configMap, downwardAPI, projected)")
	}
}

// mode returns a volume's file mode, 0644 by default as in Kubernetes.
func mode(m *int32) os.FileMode {
	if m == nil {
		return 0o644
	}
	return os.FileMode(*m)
}

// refreshTokens rewrites projected ServiceAccount tokens at 80% of their
// lifetime (as the real kubelet does) until ctx ends.
func (w *podWorker) refreshTokens(ctx context.Context, pod *corev1.Pod) {
	shortest := int64(0)
	for _, v := range pod.Spec.Volumes {
		if v.Projected == nil {
			continue
		}
		for _, src := range v.Projected.Sources {
			if t := src.ServiceAccountToken; t != nil {
				secs := ptr.Deref(t.ExpirationSeconds, defaultTokenSeconds)
				if shortest == 0 || secs < shortest {
					shortest = secs
				}
			}
		}
	}
	if shortest == 0 {
		return
	}
	period := time.Duration(shortest) * time.Second * 8 / 10
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(period):
		}
		for _, v := range pod.Spec.Volumes {
			if v.Projected == nil {
				continue
			}
			if err := w.fillVolume(ctx, pod, v, w.volumeDir(v.Name)); err != nil && ctx.Err() == nil {
				klog.Warningf("pod %s: refreshing volume %s: %v", w.key, v.Name, err)
			}
		}
	}
}

// requestToken asks the TokenRequest API for a token bound to the pod.
func (w *podWorker) requestToken(ctx context.Context, pod *corev1.Pod, p *corev1.ServiceAccountTokenProjection) (string, error) {
	var audiences []string
	if p.Audience != "" {
		audiences = []string{p.Audience}
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	req := &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         audiences,
			ExpirationSeconds: ptr.To(ptr.Deref(p.ExpirationSeconds, defaultTokenSeconds)),
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}
	got, err := w.k.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for service account %s/%s: %w", pod.Namespace, sa, err)
	}
	return got.Status.Token, nil
}

func (w *podWorker) secretFiles(ctx context.Context, ns, name string, items []corev1.KeyToPath, optional bool) (map[string][]byte, error) {
	s, err := w.k.client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && optional {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("secret %s/%s: %w", ns, name, err)
	}
	return pick(s.Data, items, "secret "+name)
}

func (w *podWorker) configMapFiles(ctx context.Context, ns, name string, items []corev1.KeyToPath, optional bool) (map[string][]byte, error) {
	cm, err := w.k.client.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && optional {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("configmap %s/%s: %w", ns, name, err)
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return pick(data, items, "configmap "+name)
}

// pick maps keys to file paths: every key by its own name, or only items.
func pick(data map[string][]byte, items []corev1.KeyToPath, what string) (map[string][]byte, error) {
	files := map[string][]byte{}
	if len(items) == 0 {
		for k, v := range data {
			files[k] = v
		}
		return files, nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			return nil, fmt.Errorf("%s has no key %q", what, it.Key)
		}
		files[it.Path] = v
	}
	return files, nil
}

func (w *podWorker) downwardFiles(pod *corev1.Pod, items []corev1.DownwardAPIVolumeFile) (map[string][]byte, error) {
	files := map[string][]byte{}
	for _, it := range items {
		if it.FieldRef == nil {
			return nil, fmt.Errorf("downwardAPI item %s: only fieldRef is supported", it.Path)
		}
		v, err := w.fieldValue(pod, it.FieldRef.FieldPath)
		if err != nil {
			return nil, err
		}
		files[it.Path] = []byte(v)
	}
	return files, nil
}

// writeFiles writes each file atomically (temp file + rename) so a
// bind-mounted volume directory never shows half a token.
func writeFiles(dir string, files map[string][]byte, perm os.FileMode) error {
	for name, data := range files {
		clean := path.Clean("/" + name)[1:]
		if clean == "" || strings.HasPrefix(clean, "..") {
			return fmt.Errorf("bad file path %q", name)
		}
		target := filepath.Join(dir, clean)
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		tmp := target + ".tmp"
		if err := os.WriteFile(tmp, data, perm); err != nil {
			return err
		}
		if err := os.Chmod(tmp, perm); err != nil {
			return err
		}
		if err := os.Rename(tmp, target); err != nil {
			return err
		}
	}
	return nil
}

// mountsFor returns the bind mounts of one container's volumeMounts.
func (w *podWorker) mountsFor(pod *corev1.Pod, c *corev1.Container) ([]mount, error) {
	byName := map[string]corev1.Volume{}
	for _, v := range pod.Spec.Volumes {
		byName[v.Name] = v
	}
	var mounts []mount
	for _, vm := range c.VolumeMounts {
		v, ok := byName[vm.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %s names no volume", vm.Name)
		}
		src := w.volumeDir(v.Name)
		if v.HostPath != nil {
			src = v.HostPath.Path
		}
		if vm.SubPath != "" {
			src = filepath.Join(src, path.Clean("/"+vm.SubPath))
			if _, err := os.Stat(src); os.IsNotExist(err) {
				if err := os.MkdirAll(src, 0o777); err != nil {
					return nil, err
				}
			}
		}
		if !filepath.IsAbs(vm.MountPath) {
			return nil, fmt.Errorf("volumeMount %s: mountPath %q is not absolute", vm.Name, vm.MountPath)
		}
		mounts = append(mounts, mount{Source: src, Target: vm.MountPath, ReadOnly: vm.ReadOnly})
	}
	// Parents before children, as a runtime mounts them.
	sort.SliceStable(mounts, func(i, j int) bool { return len(mounts[i].Target) < len(mounts[j].Target) })
	return mounts, nil
}

// fieldValue resolves a downward API field path of the pod.
func (w *podWorker) fieldValue(pod *corev1.Pod, fieldPath string) (string, error) {
	switch fieldPath {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.podIP":
		return w.ip.String(), nil
	case "status.podIPs":
		return w.ip.String(), nil
	case "status.hostIP", "status.hostIPs":
		return w.k.cfg.bridgeIP.String(), nil
	case "metadata.labels":
		return formatMap(pod.Labels), nil
	case "metadata.annotations":
		return formatMap(pod.Annotations), nil
	}
	for _, prefix := range []string{"metadata.labels", "metadata.annotations"} {
		if strings.HasPrefix(fieldPath, prefix+"['") && strings.HasSuffix(fieldPath, "']") {
			key := fieldPath[len(prefix)+2 : len(fieldPath)-2]
			if prefix == "metadata.labels" {
				return pod.Labels[key], nil
			}
			return pod.Annotations[key], nil
		}
	}
	return "", fmt.Errorf("unsupported fieldRef %q", fieldPath)
}

func formatMap(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s\n", k, strconv.Quote(m[k]))
	}
	return b.String()
}

// containerEnv builds a container's environment: the host PATH, the
// in-cluster API variables, HOSTNAME, then envFrom and env in order with
// $(VAR) references expanded like the real kubelet.
func (w *podWorker) containerEnv(ctx context.Context, pod *corev1.Pod, c *corev1.Container) ([]string, map[string]string, error) {
	cfg := w.k.cfg
	env := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := env[k]; !ok {
			order = append(order, k)
		}
		env[k] = v
	}
	set("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	// An empty home of the pod's own, as in an image: never the host's
	// (a ~/.kube/config there would win over the in-cluster config).
	home := filepath.Join(w.dir, "home")
	if err := os.MkdirAll(home, 0o755); err != nil {
		return nil, nil, fmt.Errorf("home directory: %w", err)
	}
	set("HOME", home)
	set("HOSTNAME", pod.Name)
	set("KUBERNETES_SERVICE_HOST", cfg.apiHost)
	set("KUBERNETES_SERVICE_PORT", cfg.apiPort)
	set("KUBERNETES_SERVICE_PORT_HTTPS", cfg.apiPort)
	set("KUBERNETES_PORT", "tcp://"+cfg.apiHost+":"+cfg.apiPort)
	set("KUBERNETES_PORT_"+cfg.apiPort+"_TCP", "tcp://"+cfg.apiHost+":"+cfg.apiPort)
	set("KUBERNETES_PORT_"+cfg.apiPort+"_TCP_PROTO", "tcp")
	set("KUBERNETES_PORT_"+cfg.apiPort+"_TCP_PORT", cfg.apiPort)
	set("KUBERNETES_PORT_"+cfg.apiPort+"_TCP_ADDR", cfg.apiHost)

	for _, from := range c.EnvFrom {
		var data map[string]string
		switch {
		case from.ConfigMapRef != nil:
			cm, err := w.k.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, from.ConfigMapRef.Name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) && ptr.Deref(from.ConfigMapRef.Optional, false) {
				continue
			}
			if err != nil {
				return nil, nil, fmt.Errorf("envFrom configmap %s: %w", from.ConfigMapRef.Name, err)
			}
			data = cm.Data
		case from.SecretRef != nil:
			s, err := w.k.client.CoreV1().Secrets(pod.Namespace).Get(ctx, from.SecretRef.Name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) && ptr.Deref(from.SecretRef.Optional, false) {
				continue
			}
			if err != nil {
				return nil, nil, fmt.Errorf("envFrom secret %s: %w", from.SecretRef.Name, err)
			}
			data = map[string]string{}
			for k, v := range s.Data {
				data[k] = string(v)
			}
		}
		keys := make([]string, 0, len(data))
		for k := range data {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			set(from.Prefix+k, data[k])
		}
	}

	lookup := func(name string) (string, bool) { v, ok := env[name]; return v, ok }
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			set(e.Name, expand(e.Value, lookup))
			continue
		}
		v, ok, err := w.envSource(ctx, pod, e.ValueFrom)
		if err != nil {
			return nil, nil, fmt.Errorf("env %s: %w", e.Name, err)
		}
		if ok {
			set(e.Name, v)
		}
	}
	list := make([]string, 0, len(order))
	for _, k := range order {
		list = append(list, k+"="+env[k])
	}
	return list, env, nil
}

// envSource resolves one valueFrom; ok is false for a missing optional key.
func (w *podWorker) envSource(ctx context.Context, pod *corev1.Pod, src *corev1.EnvVarSource) (string, bool, error) {
	switch {
	case src.FieldRef != nil:
		v, err := w.fieldValue(pod, src.FieldRef.FieldPath)
		return v, err == nil, err
	case src.SecretKeyRef != nil:
		ref := src.SecretKeyRef
		s, err := w.k.client.CoreV1().Secrets(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
		if err != nil {
			if apierrors.IsNotFound(err) && ptr.Deref(ref.Optional, false) {
				return "", false, nil
			}
			return "", false, fmt.Errorf("secret %s: %w", ref.Name, err)
		}
		v, ok := s.Data[ref.Key]
		if !ok {
			if ptr.Deref(ref.Optional, false) {
				return "", false, nil
			}
			return "", false, fmt.Errorf("secret %s has no key %q", ref.Name, ref.Key)
		}
		return string(v), true, nil
	case src.ConfigMapKeyRef != nil:
		ref := src.ConfigMapKeyRef
		cm, err := w.k.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
		if err != nil {
			if apierrors.IsNotFound(err) && ptr.Deref(ref.Optional, false) {
				return "", false, nil
			}
			return "", false, fmt.Errorf("configmap %s: %w", ref.Name, err)
		}
		v, ok := cm.Data[ref.Key]
		if !ok {
			if ptr.Deref(ref.Optional, false) {
				return "", false, nil
			}
			return "", false, fmt.Errorf("configmap %s has no key %q", ref.Name, ref.Key)
		}
		return v, true, nil
	case src.ResourceFieldRef != nil:
		return "", false, fmt.Errorf("resourceFieldRef %s is not supported by the test bed", src.ResourceFieldRef.Resource)
	}
	return "", false, fmt.Errorf("empty valueFrom")
}

// expand replaces $(NAME) with NAME's value where known, and $$ with $, as
// Kubernetes does in env values, command and args.
func expand(s string, lookup func(string) (string, bool)) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 >= len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			name := s[i+2 : i+2+end]
			if v, ok := lookup(name); ok {
				b.WriteString(v)
			} else {
				b.WriteString(s[i : i+3+end])
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}
