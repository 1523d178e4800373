{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: RELEASE-NAME, or RELEASE when it already contains the chart name.
Truncated to 49 characters so that "-control-plane" (14) still fits the 63 a Service name
may have.
*/}}
{{- define "relay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 49 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 49 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 49 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "relay.controlPlane.fullname" -}}
{{- printf "%s-control-plane" (include "relay.fullname" .) }}
{{- end }}

{{- define "relay.dataPlane.fullname" -}}
{{- printf "%s-data-plane" (include "relay.fullname" .) }}
{{- end }}

{{/*
The StatefulSet's governing (headless) Service: within the 63 characters of a Service name.
*/}}
{{- define "relay.dataPlane.headlessName" -}}
{{- printf "%s-headless" (include "relay.dataPlane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart label value: name-version.
*/}}
{{- define "relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels common to every resource.
*/}}
{{- define "relay.labels" -}}
helm.sh/chart: {{ include "relay.chart" . }}
{{ include "relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: relay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels common to both components.
*/}}
{{- define "relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "relay.controlPlane.labels" -}}
{{ include "relay.labels" . }}
app.kubernetes.io/component: control-plane
{{- end }}

{{- define "relay.controlPlane.selectorLabels" -}}
{{ include "relay.selectorLabels" . }}
app.kubernetes.io/component: control-plane
{{- end }}

{{- define "relay.dataPlane.labels" -}}
{{ include "relay.labels" . }}
app.kubernetes.io/component: data-plane
{{- end }}

{{- define "relay.dataPlane.selectorLabels" -}}
{{ include "relay.selectorLabels" . }}
app.kubernetes.io/component: data-plane
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference. Call with (dict "image" .Values.controlPlane.image "root" $).
*/}}
{{- define "relay.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion | toString) }}
{{- end }}

{{/*
Names of the Secrets the chart generates from secrets.*.value.
*/}}
{{- define "relay.controlPlane.secretName" -}}
{{- printf "%s-control-plane" (include "relay.fullname" .) }}
{{- end }}

{{- define "relay.dataPlane.secretName" -}}
{{- printf "%s-data-plane" (include "relay.fullname" .) }}
{{- end }}

{{/*
A secretKeyRef body (name + key) for one entry of .Values.secrets.
Call with (dict "ref" .Values.secrets.X "path" "secrets.X" "generated" SECRET_NAME "key" GENERATED_KEY "hint" "how to make one").
Fails rendering when neither value nor existingSecret is set, or when both are.
*/}}
{{- define "relay.secretKeyRef" -}}
{{- $ref := .ref }}
{{- if and $ref.value $ref.existingSecret }}
{{- fail (printf "%s: set either %s.value or %s.existingSecret, not both" .path .path .path) }}
{{- end }}
{{- $_ := required (printf "%s is required: set %s.existingSecret (the name of a Secret holding key %q; see existingSecretKey) or %s.value (%s)" .path .path $ref.existingSecretKey .path .hint) (or $ref.existingSecret $ref.value) }}
{{- if $ref.existingSecret }}
name: {{ $ref.existingSecret }}
key: {{ required (printf "%s.existingSecretKey must not be empty" .path) $ref.existingSecretKey }}
{{- else }}
name: {{ .generated }}
key: {{ .key }}
{{- end }}
{{- end }}

{{/*
True ("true") when the optional data-plane cache key is configured.
*/}}
{{- define "relay.dataPlane.hasCacheKey" -}}
{{- $ref := .Values.secrets.dataPlaneCacheKey }}
{{- if or $ref.value $ref.existingSecret }}true{{ end }}
{{- end }}

{{/*
Soft/hard pod anti-affinity on the host name, used when .affinity is empty.
Call with (dict "component" .Values.controlPlane "selector" (include "relay.controlPlane.selectorLabels" .)).
*/}}
{{- define "relay.affinity" -}}
{{- if .component.affinity }}
{{- toYaml .component.affinity }}
{{- else if eq .component.podAntiAffinity "soft" }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- .selector | nindent 12 }}
{{- else if eq .component.podAntiAffinity "hard" }}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- .selector | nindent 10 }}
{{- end }}
{{- end }}

{{/*
Default control-plane URL for the data plane.
*/}}
{{- define "relay.dataPlane.controlPlaneUrl" -}}
{{- if .Values.dataPlane.controlPlaneUrl }}
{{- .Values.dataPlane.controlPlaneUrl }}
{{- else }}
{{- printf "%s://%s.%s.svc:%v" (ternary "http" "https" (eq .Values.tls.mode "off")) (include "relay.controlPlane.fullname" .) .Release.Namespace .Values.controlPlane.service.grpcPort }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds of the data plane: it must exceed
shutdownGraceSecs + preStopSleepSeconds + 10 so the spool drains before SIGKILL.
*/}}
{{- define "relay.dataPlane.terminationGrace" -}}
{{- $dp := .Values.dataPlane }}
{{- $min := add (int $dp.shutdownGraceSecs) (int $dp.preStopSleepSeconds) 10 }}
{{- if gt (int $dp.terminationGracePeriodSeconds) 0 }}
{{- if le (int $dp.terminationGracePeriodSeconds) (int $min) }}
{{- fail (printf "dataPlane.terminationGracePeriodSeconds (%d) must be more than dataPlane.shutdownGraceSecs + dataPlane.preStopSleepSeconds + 10 (= %d): the data plane drains its usage spool on SIGTERM" (int $dp.terminationGracePeriodSeconds) (int $min)) }}
{{- end }}
{{- int $dp.terminationGracePeriodSeconds }}
{{- else }}
{{- add $min 5 }}
{{- end }}
{{- end }}

{{/*
Host-form address: wraps IPv6 literals in brackets.
Call with (list ADDRESS PORT).
*/}}
{{- define "relay.listenAddr" -}}
{{- $addr := index . 0 | toString }}
{{- if contains ":" $addr }}
{{- printf "[%s]:%v" $addr (index . 1) }}
{{- else }}
{{- printf "%s:%v" $addr (index . 1) }}
{{- end }}
{{- end }}

{{/*
The Secret with the control plane's certificate (tls.crt, tls.key) and the CA
data planes trust (ca.crt); empty when TLS is off.
*/}}
{{- define "relay.tls.secretName" -}}
{{- if or (eq .Values.tls.mode "generate") (eq .Values.tls.mode "cert-manager") -}}
{{- printf "%s-tls" (include "relay.controlPlane.fullname" .) -}}
{{- else if eq .Values.tls.mode "secret" -}}
{{- required "tls.secret is required with tls.mode=secret: a Secret with tls.crt, tls.key and ca.crt" .Values.tls.secret -}}
{{- end -}}
{{- end }}

{{/* Fails on TLS settings that cannot work together. */}}
{{- define "relay.tls.check" -}}
{{- if and .Values.tls.clientAuth.enabled (eq .Values.tls.mode "off") -}}
{{- fail "tls.clientAuth.enabled needs TLS: set tls.mode to generate, secret or cert-manager" -}}
{{- end -}}
{{- if eq .Values.tls.mode "cert-manager" -}}
{{- $_ := required "tls.certManager.issuer.name is required with tls.mode=cert-manager (the cert-manager issuer of the control plane's certificate)" .Values.tls.certManager.issuer.name -}}
{{- end -}}
{{- if .Values.tls.clientAuth.enabled -}}
{{- $_ := required "tls.clientAuth.issuer.name is required with tls.clientAuth.enabled (the cert-manager issuer of data-plane certificates)" .Values.tls.clientAuth.issuer.name -}}
{{- $_ := required "tls.clientAuth.caSecret is required with tls.clientAuth.enabled (a Secret with ca.crt: the CA of that issuer)" .Values.tls.clientAuth.caSecret -}}
{{- end -}}
{{- end }}

{{/*
RELAY_REDIS_URL from redis.existingSecret or redis.url (nothing without either).
*/}}
{{- define "relay.redisEnv" -}}
{{- if .Values.redis.existingSecret.name }}
- name: RELAY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret.name | quote }}
      key: {{ .Values.redis.existingSecret.key | quote }}
{{- else if .Values.redis.url }}
{{- if regexMatch "^[a-z]+://[^/@]*:[^/@]*@" .Values.redis.url }}
{{- fail "redis.url holds a password: it would be readable in the workloads' spec; put the URL in a Secret and name it in redis.existingSecret.name (key: redis.existingSecret.key)" }}
{{- end }}
- name: RELAY_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- end }}
