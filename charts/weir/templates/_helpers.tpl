{{/* Labels every object of the chart carries. */}}
{{- define "weir.labels" -}}
app.kubernetes.io/name: weir
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* What selects the controller pods. */}}
{{- define "weir.controllerSelector" -}}
app.kubernetes.io/name: weir
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "weir.controllerImage" -}}
{{ .Values.controller.image.repository }}:{{ .Values.controller.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "weir.proxyImage" -}}
{{ .Values.proxy.image.repository }}:{{ .Values.proxy.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Where sidecars reach the controller (the gRPC Service). */}}
{{- define "weir.controllerAddr" -}}
weir-controller.{{ .Release.Namespace }}.svc:8090
{{- end }}

{{/* Object names. One release per cluster: the CRDs and the webhook are cluster-wide. */}}
{{- define "weir.identitySecret" -}}
{{ .Values.identity.existingSecret | default "weir-identity" }}
{{- end }}
