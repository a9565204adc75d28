{{/*
Named templates of the raft-elector chart.

The ones meant for your own workload (see the chart README, "Add the sidecar
to your workload") take this chart's context: "." inside this chart, and
(index .Subcharts "raft-elector") from a parent chart that depends on it.

  raft-elector.memberLabels        pod labels that make a pod a group member
  raft-elector.serviceAccountName  the ServiceAccount the Role is bound to
  raft-elector.sidecar             the sidecar container (one list item)
  raft-elector.volumes             its state volume (one list item)
  raft-elector.env                 downward-API env (POD_NAME, POD_NAMESPACE, POD_UID, POD_IP)
*/}}

{{/* Chart name, overridable. */}}
{{- define "raft-elector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Base name of every object: the release name, with the chart name appended
unless the release name already contains it; at most 57 characters so that
suffixes such as "-peers" still fit a 63-character DNS label.
*/}}
{{- define "raft-elector.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 57 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "raft-elector.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object the chart renders. */}}
{{- define "raft-elector.labels" -}}
helm.sh/chart: {{ include "raft-elector.chart" . }}
{{ include "raft-elector.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that identify this release's objects. */}}
{{- define "raft-elector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raft-elector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The election group: the sidecars' --cluster-id and the value of the
raft-elector.io/group label that the peer Service, the NetworkPolicy and the
PodDisruptionBudget select.
*/}}
{{- define "raft-elector.group" -}}
{{- default (include "raft-elector.fullname" .) .Values.group.name }}
{{- end }}

{{/* Pod labels that make a pod a member of this election group. */}}
{{- define "raft-elector.memberLabels" -}}
raft-elector.io/group: {{ include "raft-elector.group" . }}
{{- end }}

{{/* Name of the headless Service the sidecars discover each other through. */}}
{{- define "raft-elector.peerServiceName" -}}
{{- printf "%s-peers" (include "raft-elector.fullname" .) }}
{{- end }}

{{/* Name of the Secret holding the shared peer secret. */}}
{{- define "raft-elector.secretName" -}}
{{- default (printf "%s-peer-secret" (include "raft-elector.fullname" .)) .Values.peerSecret.existingSecret }}
{{- end }}

{{/* The ServiceAccount the member pods run as. */}}
{{- define "raft-elector.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "raft-elector.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name the ServiceAccount your pods run as when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The sidecar image: repository:tag, or repository@digest when a digest is set. */}}
{{- define "raft-elector.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Where the sidecar persists its hard state (an emptyDir). */}}
{{- define "raft-elector.stateDir" -}}
/var/lib/raft-elector
{{- end }}

{{/*
Pod identity from the downward API, as the sidecar reads it. Also handy for
the app container.
*/}}
{{- define "raft-elector.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_UID
  valueFrom:
    fieldRef:
      fieldPath: metadata.uid
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/* The sidecar's state volume: one list item for the pod's volumes. */}}
{{- define "raft-elector.volumes" -}}
- name: raft-elector-state
  emptyDir:
    sizeLimit: {{ .Values.sidecar.stateSizeLimit }}
{{- end }}

{{/*
The sidecar container: one list item for the pod's containers. Needs the
pod to carry raft-elector.memberLabels, run as
raft-elector.serviceAccountName and have raft-elector.volumes.
*/}}
{{- define "raft-elector.sidecar" -}}
{{- $s := .Values.sidecar -}}
- name: raft-elector
  image: {{ include "raft-elector.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - run
    - --service={{ include "raft-elector.peerServiceName" . }}
    - --cluster-id={{ include "raft-elector.group" . }}
    - --bootstrap-expect={{ .Values.group.expectedMembers }}
    - --http-listen=0.0.0.0:{{ $s.httpPort }}
    - --peer-listen=0.0.0.0:{{ $s.peerPort }}
    - --state-dir={{ include "raft-elector.stateDir" . }}
    - --log-format={{ $s.logFormat }}
    - --log-level={{ $s.logLevel }}
    {{- with $s.electionTimeoutMin }}
    - --election-timeout-min={{ . }}
    {{- end }}
    {{- with $s.electionTimeoutMax }}
    - --election-timeout-max={{ . }}
    {{- end }}
    {{- with $s.heartbeatInterval }}
    - --heartbeat-interval={{ . }}
    {{- end }}
    {{- with $s.maxVoters }}
    - --max-voters={{ . }}
    {{- end }}
    {{- if not $s.kubernetes }}
    - --no-kubernetes
    {{- end }}
    {{- range $s.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    {{- include "raft-elector.env" . | nindent 4 }}
    - name: RAFT_ELECTOR_SECRET
      valueFrom:
        secretKeyRef:
          name: {{ include "raft-elector.secretName" . }}
          key: {{ .Values.peerSecret.key }}
    {{- with $s.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: elector-http
      containerPort: {{ $s.httpPort }}
      protocol: TCP
    - name: elector-raft
      containerPort: {{ $s.peerPort }}
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $s.httpPort }}
    periodSeconds: 2
    timeoutSeconds: 1
    failureThreshold: 2
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $s.httpPort }}
    periodSeconds: 10
    timeoutSeconds: 2
    failureThreshold: 3
  resources:
    {{- toYaml $s.resources | nindent 4 }}
  securityContext:
    {{- toYaml $s.securityContext | nindent 4 }}
  volumeMounts:
    - name: raft-elector-state
      mountPath: {{ include "raft-elector.stateDir" . }}
{{- end }}
