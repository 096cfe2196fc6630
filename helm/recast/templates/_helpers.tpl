{{/* Names, labels and the pieces every Recast container shares. */}}

{{- define "recast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "recast.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "recast.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; pass (dict "ctx" $ "component" "api"). */}}
{{- define "recast.labels" -}}
helm.sh/chart: {{ include "recast.chart" .ctx }}
{{ include "recast.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: recast
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "recast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recast.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "recast.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "recast.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "recast.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "recast.secretName" -}}
{{- default (include "recast.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "recast.redisName" -}}
{{- printf "%s-redis" (include "recast.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Whether the credentials file is mounted. */}}
{{- define "recast.hasCredentials" -}}
{{- if .Values.secrets.credentialsKey }}true{{ end }}
{{- end }}

{{- define "recast.credentialsDir" -}}/etc/recast/credentials{{- end }}

{{/* The pod security context: the chart-wide one with the component's fields over it. */}}
{{- define "recast.podSecurityContext" -}}
{{- toYaml (mustMergeOverwrite (deepCopy .ctx.Values.podSecurityContext) .own) }}
{{- end }}

{{- define "recast.containerSecurityContext" -}}
{{- toYaml (mustMergeOverwrite (deepCopy .ctx.Values.containerSecurityContext) .own) }}
{{- end }}

{{/* Refuses contradictory Redis settings; renders nothing. */}}
{{- define "recast.validateRedis" -}}
{{- $r := .Values.redis }}
{{- if $r.bundled.enabled }}
{{- if or $r.url $r.existingSecret }}
{{- fail "redis.url / redis.existingSecret name an external Redis: set redis.bundled.enabled=false to use it" }}
{{- end }}
{{- else if not (or $r.url $r.existingSecret) }}
{{- fail "redis.bundled.enabled=false needs redis.url or redis.existingSecret (an external Redis)" }}
{{- end }}
{{- end }}

{{/*
Environment every Recast container gets: Redis URL (a Secret when it may hold a password), the
ConfigMap's plain settings, the credentials file's path, HOME on the writable /tmp.
*/}}
{{- define "recast.env" -}}
- name: RECAST_REDIS_URL
{{- if .Values.redis.bundled.enabled }}
  value: {{ printf "redis://%s:6379/0" (include "recast.redisName" .) | quote }}
{{- else if .Values.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ include "recast.fullname" . }}
      key: redis-url
{{- end }}
{{- if include "recast.hasCredentials" . }}
- name: RECAST_CREDENTIALS_FILE
  value: {{ printf "%s/%s" (include "recast.credentialsDir" .) .Values.secrets.credentialsKey | quote }}
{{- end }}
- name: HOME
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- include "recast.validateRedis" . }}
{{- end }}

{{- define "recast.envFrom" -}}
- configMapRef:
    name: {{ include "recast.fullname" . }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes every Recast pod gets: /tmp, the credentials file, extraVolumes. */}}
{{- define "recast.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- if include "recast.hasCredentials" . }}
- name: credentials
  secret:
    secretName: {{ include "recast.secretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.secrets.credentialsKey }}
        path: {{ .Values.secrets.credentialsKey }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "recast.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if include "recast.hasCredentials" . }}
- name: credentials
  mountPath: {{ include "recast.credentialsDir" . }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Rolls the pods when the settings change. */}}
{{- define "recast.checksums" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}
